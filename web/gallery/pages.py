"""Gallery pages: the signed link that signs in, the grid (filters, search, cursor pages,
infinite scroll) and an image's page with its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlmodel import Session

from core.errors import InvalidRequest
from core.infotext import parse_infotext
from storage import accounts
from storage import gallery as store
from storage import jobs as job_repo
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, own_image, page, parse_day, secured
from web.gallery.make import new_nonce
from web.session import HOME, current_account, open_link

router = APIRouter(include_in_schema=False, route_class=PageRoute)
PAGE_SIZE = 24
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]


@router.get("/g/{token}")
async def sign_in(token: str, ctx: Ctx) -> Response:
    """A link from the bot: check it, set the session cookie, go to the short gallery URL.
    The target is fixed: no parameter of the request can send the browser elsewhere."""
    response = RedirectResponse(HOME, status_code=303)
    open_link(ctx, token, response)
    response.headers["Cache-Control"] = "no-store"
    secured(response)
    response.headers["Referrer-Policy"] = "no-referrer"  # this URL carries the token
    return response


@router.get("/gallery")
async def grid(
    request: Request,
    ctx: Ctx,
    account_id: Account,
    q: str = "",
    style: str = "",
    model: str = "",
    platform: str = "",
    since: str = "",
    until: str = "",
    before: str | None = None,
    partial: bool = False,
) -> Response:
    """The account's images, newest first; ``partial`` returns only the next cards (for the
    infinite scroll), the same page otherwise."""
    filters = {"q": q, "style": style, "model": model, "platform": platform,
               "since": since, "until": until}
    start = parse_day(since, "since")
    end = parse_day(until, "until", end=True)

    def read(s: Session) -> tuple[store.ImagePage, list[str]]:
        # One trip to the database thread: the page, and (for a whole page) the
        # platforms of the account's identities for the filter menu.
        found = store.list_images(
            session=s, account_id=account_id, before=before or None, limit=PAGE_SIZE,
            style=style or None, model=model or None, platform=platform or None,
            since=start, until=end, search=q or None,
        )
        ids = [] if partial else accounts.list_identities(session=s, account_id=account_id)
        return found, sorted({i.platform for i in ids})

    result, platforms = await ctx.store(read, read_only=True)
    kept = {k: v for k, v in filters.items() if v}
    next_url = None
    if result.next_cursor:
        next_url = f"{HOME}?{urlencode({**kept, 'before': result.next_cursor})}"
    values: dict[str, Any] = {"images": result.items, "next_url": next_url, "filters": filters}
    if partial:
        return page(request, ctx, "_cards.html", **values)
    facets = Facets(styles=sorted(ctx.client.styles.names()),
                    models=sorted(ctx.client.models.names()), platforms=platforms)
    return page(request, ctx, "grid.html", facets=facets, zip_all=f"{HOME}/zip?all=1",
                searching=bool(kept), **values)


@dataclass(frozen=True)
class Facets:
    """The filter menus. Styles and models come from the registries, not from a scan of the
    gallery (a DISTINCT over 10,000 rows cost more than the whole page); platforms are the
    account's linked identities."""

    styles: list[str]
    models: list[str]
    platforms: list[str]


@router.get("/gallery/image/{image_id:int}")
async def image_page(request: Request, image_id: int, ctx: Ctx, account_id: Account) -> Response:
    image = await own_image(ctx, account_id, image_id)
    job = await ctx.store(
        lambda s: job_repo.get_job(session=s, job_id=image.job_id), read_only=True
    )
    try:
        info = parse_infotext(image.infotext) if image.infotext else None
    except InvalidRequest:
        info = None  # shown raw below; the request's own values fill the table
    req = job.request
    params = [
        ("Prompt", image.prompt),
        ("Negative prompt", image.negative or "-"),
        ("Styles", ", ".join(image.styles) or "-"),
        ("Model", image.model or req.model or "-"),
        ("Seed", str(image.seed)),
        ("Size", f"{image.width}x{image.height}"),
        ("Steps", str(info.steps if info else req.steps)),
        ("Sampler", info.sampler if info else req.scheduler),
        ("CFG scale", str(info.cfg_scale if info else req.guidance)),
        ("Kind", req.kind.value),
        ("Made", image.created_at.strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return page(request, ctx, "image.html", image=image, params=params, nonce=new_nonce(),
                control=req.control)
