"""Gallery files and changes: thumbnails, the PNG download, streamed ZIPs, and delete."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlmodel import Session

from core.errors import Forbidden, InvalidRequest, NotFound
from storage import gallery as store
from storage.gallery import MAX_PAGE, ImageRead
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, own_image, secured
from web.gallery.files import delete_blobs, download_name, stream_zip, thumbnail
from web.session import HOME, check_csrf, current_account

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]
MAX_SELECTION = 1000
# Private to the person: a shared proxy must not keep them, the browser may for a while.
PRIVATE_CACHE = "private, max-age=86400"


@router.get("/gallery/thumb/{image_id:int}.webp")
async def thumb(image_id: int, ctx: Ctx, account_id: Account) -> Response:
    image = await own_image(ctx, account_id, image_id)
    try:
        path = await asyncio.to_thread(thumbnail, ctx.blobs, image)
    except NotFound:
        raise NotFound("this image's file is missing") from None
    response = FileResponse(path, media_type="image/webp")
    response.headers["Cache-Control"] = PRIVATE_CACHE
    return secured(response)


@router.get("/gallery/image/{image_id:int}.png")
async def download(
    image_id: int, ctx: Ctx, account_id: Account, inline: bool = False
) -> Response:
    """The PNG as made, with its A1111 infotext chunk (the worker wrote it in)."""
    image = await own_image(ctx, account_id, image_id)
    try:
        path = ctx.blobs.path(image.blob_key)
    except NotFound:
        raise NotFound("this image's file is missing") from None
    response = FileResponse(
        path, media_type="image/png", filename=download_name(image),
        content_disposition_type="inline" if inline else "attachment",
    )
    response.headers["Cache-Control"] = PRIVATE_CACHE
    return secured(response)


@router.get("/gallery/zip")
async def download_zip(
    ctx: Ctx,
    account_id: Account,
    ids: Annotated[list[int], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    all: bool = False,
) -> Response:
    """A ZIP of the chosen images, or of the whole gallery, streamed as it is written."""
    if not all and not ids:
        raise InvalidRequest("choose some images first, or download everything")
    if len(ids) > MAX_SELECTION:
        raise InvalidRequest(f"choose at most {MAX_SELECTION} images, got {len(ids)}")
    if all:
        images = _everything(ctx, account_id)
    else:
        chosen = await ctx.store(lambda s: _chosen(s, account_id, ids), read_only=True)
        images = iter(chosen)
    stamp = ctx.now().strftime("%Y%m%d-%H%M")
    response = StreamingResponse(
        stream_zip(ctx.blobs, images), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="atelier-{stamp}.zip"',
                 "Cache-Control": "no-store"},
    )
    return secured(response)


def _chosen(session: Session, account_id: int, ids: list[int]) -> list[ImageRead]:
    out = []
    for image_id in dict.fromkeys(ids):
        try:
            out.append(store.get_image(session=session, image_id=image_id, account_id=account_id))
        except (NotFound, Forbidden):
            raise NotFound("there is no such image in your gallery") from None
    return out


def _everything(ctx: WebContext, account_id: int) -> Iterator[ImageRead]:
    """Every live image, a page at a time (the stream runs in a worker thread)."""
    before: str | None = None
    while True:
        with ctx.sessions() as session:
            result = store.list_images(
                session=session, account_id=account_id, before=before, limit=MAX_PAGE
            )
        yield from result.items
        if result.next_cursor is None:
            return
        before = result.next_cursor


@router.post("/gallery/image/{image_id:int}/delete")
async def delete(
    request: Request,
    image_id: int,
    ctx: Ctx,
    account_id: Account,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    """Remove an image from the gallery; its files go too unless another image shares them."""
    check_csrf(ctx, request, csrf)
    await own_image(ctx, account_id, image_id)
    now: datetime = ctx.now()
    gone = await ctx.store(lambda s: store.delete_image(
        session=s, image_id=image_id, account_id=account_id, now=now))
    await asyncio.to_thread(delete_blobs, ctx.blobs, gone)
    return secured(RedirectResponse(HOME, status_code=303))
