"""Vary (Region): a mask editor for one of the account's images, opened from the image's page
or by the signed link a chat's button sends; the painted region is repainted with the prompt
the person writes, charged as any job, and delivered to the chat the image came from (and to
the gallery, where every image lands)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response

from core.errors import Forbidden, ImageRejected, InvalidRequest
from core.images import ValidatedImage, decode_png_mask, validate_mask
from core.jobs import DeliveryTarget
from core.offload import run_heavy
from core.request import Edit, GenerationRequest, JobKind
from core.signing import VARY_REGION_PURPOSE, verify
from storage import jobs as job_repo
from storage.gallery import ImageRead
from storage.jobs import JobRead
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, own_image, page, secured
from web.gallery.deliveries import FRONTEND
from web.gallery.make import _requester, new_nonce
from web.session import check_csrf, current_account, start_session

# The link and the editor are pages (our errors as the error page); the editor's submit is
# fetched by its script, which reads the API's JSON error body.
router = APIRouter(include_in_schema=False, route_class=PageRoute)
submit_router = APIRouter(include_in_schema=False)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]

# The painted region is drawn anew from noise (the rest of the picture is its context).
VARY_REGION_STRENGTH = 1.0
# The front ends whose jobs have a chat to post the result back to.
CHAT_FRONTENDS = frozenset({"telegram", "discord"})


@router.get("/v/{token}")
async def open_vary_link(token: str, ctx: Ctx) -> Response:
    """A chat's Vary (Region) button: check the link, sign in as its account (as a gallery
    link does) and open the editor of its image, which must still be that account's."""
    subject = verify(ctx.signing_key, token, purpose=VARY_REGION_PURPOSE, now=ctx.now())
    account_id, image_id = _subject(subject)
    await own_image(ctx, account_id, image_id)  # deleted since: "not found", no session
    response = RedirectResponse(f"/gallery/image/{image_id}/vary", status_code=303)
    start_session(ctx, account_id, token, response)
    response.headers["Cache-Control"] = "no-store"
    secured(response)
    response.headers["Referrer-Policy"] = "no-referrer"  # this URL carries the token
    return response


@router.get("/gallery/image/{image_id:int}/vary")
async def editor(request: Request, image_id: int, ctx: Ctx, account_id: Account) -> Response:
    """The mask editor: the image under a canvas to paint on, and the region's prompt."""
    image = await own_image(ctx, account_id, image_id)
    job = await ctx.store(
        lambda s: job_repo.get_job(session=s, job_id=image.job_id), read_only=True
    )
    chat = job.delivery.frontend if _chat_of(job) is not None else None
    return page(request, ctx, "vary.html", image=image, prompt=job.request.prompt,
                nonce=new_nonce(), chat=chat, max_prompt=ctx.settings.limits.max_prompt_chars)


@submit_router.post("/gallery/image/{image_id:int}/vary")
async def submit(
    request: Request,
    image_id: int,
    ctx: Ctx,
    account_id: Account,
    mask: Annotated[UploadFile, File()],
    prompt: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    nonce: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Repaint the masked region: ``{"job": url}`` of the job's page, or the error body."""
    check_csrf(ctx, request, csrf)
    image = await own_image(ctx, account_id, image_id)
    checked = await _checked_mask(ctx, mask, image)
    job = await ctx.store(
        lambda s: job_repo.get_job(session=s, job_id=image.job_id), read_only=True
    )
    requester = await ctx.store(lambda s: _requester(s, job), read_only=True)
    png = await asyncio.to_thread(ctx.blobs.get, image.blob_key)  # megabytes, off the loop
    wanted = vary_region_request(job, image, png, checked.png, prompt)
    key = f"web:{account_id}:{image_id}:vary:{nonce or secrets.token_urlsafe(12)}"
    submitted = await ctx.client.submit(
        wanted, requester, _chat_of(job) or DeliveryTarget(frontend=FRONTEND), idempotency_key=key
    )
    return secured(JSONResponse({"job": f"/gallery/job/{submitted.job_id}"}))


def vary_region_request(
    job: JobRead, image: ImageRead, png: bytes, mask: bytes, prompt: str
) -> GenerationRequest:
    """The image, its region (white in ``mask``) repainted with ``prompt`` (the job's own
    when empty); its style, size and model, a new seed."""
    return job.request.model_copy(update={
        "kind": JobKind.inpaint, "init_image": png, "mask": mask,
        "prompt": prompt.strip() or job.request.prompt, "width": image.width,
        "height": image.height, "styles": tuple(image.styles), "strength": VARY_REGION_STRENGTH,
        "seed": None, "count": 1, "edit": Edit.vary_region,
    })


async def _checked_mask(ctx: WebContext, upload: UploadFile, image: ImageRead) -> ValidatedImage:
    """The uploaded mask: within the upload limits, decoded bomb-safe (off the loop), the
    image's size, and not empty."""
    limits = ctx.settings.limits
    data = await upload.read(limits.max_upload_bytes + 1)  # never more than the limit + 1
    checked = await run_heavy(validate_mask, data, max_bytes=limits.max_upload_bytes,
                              max_pixels=limits.max_upload_pixels)
    if (checked.width, checked.height) != (image.width, image.height):
        raise ImageRejected(f"the mask must be {image.width}x{image.height} like the image, "
                            f"got {checked.width}x{checked.height}")
    if not await run_heavy(_painted, checked.png):
        raise InvalidRequest("the mask is empty: paint the region to change first")
    return checked


def _painted(png: bytes) -> bool:
    return decode_png_mask(png).getbbox() is not None


def _chat_of(job: JobRead) -> DeliveryTarget | None:
    """Where the image's own job was posted, when that was a chat: a new status message is
    not posted there (the person is on the web page), only the result."""
    target = job.delivery
    if target.frontend not in CHAT_FRONTENDS or not target.chat_id:
        return None
    keep = {k: v for k, v in target.extra.items() if k in ("owner", "original")}
    return DeliveryTarget(frontend=target.frontend, chat_id=target.chat_id, extra=keep)


def _subject(subject: str) -> tuple[int, int]:
    account, sep, image = subject.partition(":")
    if not sep or not account.isdigit() or not image.isdigit():
        raise Forbidden("this link is not valid; ask the bot for a new one")
    return int(account), int(image)
