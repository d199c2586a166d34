""""Make again" (optionally steered by an uploaded control picture, a ControlNet unit) and
"variations" from an image's page: submitted through the cluster Client (charged as chat jobs
are), then a page that follows the job over Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlmodel import Session

from cluster.client import Client
from cluster.events import NSFW_EXTRA_KEY, EventKind, JobEvent
from core.control import ControlUnit, preprocessor_for
from core.errors import AtelierError, Conflict, InvalidRequest, NotFound
from core.images import validate_image
from core.jobs import DeliveryTarget, Requester
from core.offload import run_heavy
from core.request import GenerationRequest
from core.variations import variation
from storage import accounts
from storage import jobs as job_repo
from storage.gallery import ImageRead
from storage.jobs import JobRead
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, own_image, page, secured
from web.gallery.deliveries import FRONTEND
from web.session import check_csrf, current_account

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]


def new_nonce() -> str:
    """Put in each make form: submitting the same form twice makes (and charges) one job."""
    return secrets.token_urlsafe(12)


def again_request(job: JobRead, image: ImageRead, *, keep_seed: bool) -> GenerationRequest:
    """The image's own settings, once more: its style, its seed if asked, else a new one."""
    return job.request.model_copy(update={
        "styles": tuple(image.styles), "count": 1, "seed": image.seed if keep_seed else None,
    })


def variation_request(job: JobRead, image: ImageRead, png: bytes) -> GenerationRequest:
    """New takes on the image, one at a time (``core.variations``, as the chat's V buttons)."""
    return variation(job.request, png, image.width, image.height, tuple(image.styles), count=1)


@router.post("/gallery/image/{image_id:int}/make")
async def make(
    request: Request,
    image_id: int,
    ctx: Ctx,
    account_id: Account,
    csrf: Annotated[str, Form()] = "",
    nonce: Annotated[str, Form(max_length=64)] = "",
    mode: Annotated[str, Form()] = "again",
    keep_seed: Annotated[bool, Form()] = False,
    control: Annotated[UploadFile | None, File()] = None,
    preprocessor: Annotated[str, Form(max_length=32)] = "canny",
) -> Response:
    check_csrf(ctx, request, csrf)
    if mode not in ("again", "variations"):
        raise InvalidRequest(f"mode must be again or variations, got {mode[:20]!r}")
    unit = await _control_unit(ctx, control, preprocessor) if mode == "again" else None
    image = await own_image(ctx, account_id, image_id)
    job = await ctx.store(
        lambda s: job_repo.get_job(session=s, job_id=image.job_id), read_only=True
    )
    requester = await ctx.store(lambda s: _requester(s, job), read_only=True)
    if mode == "again":
        wanted = again_request(job, image, keep_seed=keep_seed)
        if unit is not None:
            wanted = wanted.model_copy(update={"control": unit})
    else:
        png = await asyncio.to_thread(ctx.blobs.get, image.blob_key)  # megabytes, off the loop
        wanted = variation_request(job, image, png)
    key = f"web:{account_id}:{image_id}:{nonce or secrets.token_urlsafe(12)}"
    quote = await ctx.client.jobs.admit(wanted, requester, key)
    submitted = await ctx.client.jobs.submit(quote, DeliveryTarget(frontend=FRONTEND))
    return secured(RedirectResponse(f"/gallery/job/{submitted.job_id}", status_code=303))


async def _control_unit(
    ctx: WebContext, upload: UploadFile | None, preprocessor: str
) -> ControlUnit | None:
    """The form's control picture as a ControlNet unit (the catalogue's ControlNet for the
    chosen preprocessor, picked at admission); None when no file was chosen (a browser sends
    an empty part). The picture passes the upload checks chat photos pass, off the loop."""
    if upload is None:
        return None
    limits = ctx.settings.limits
    data = await upload.read(limits.max_upload_bytes + 1)  # never more than the limit + 1
    if not data:
        return None
    kind = preprocessor_for(preprocessor)
    checked = await run_heavy(validate_image, data, max_bytes=limits.max_upload_bytes,
                              max_pixels=limits.max_upload_pixels, purpose="control picture")
    return ControlUnit(preprocessor=kind, image=checked.png)


@router.get("/gallery/job/{job_id}")
async def job_page(request: Request, job_id: str, ctx: Ctx, account_id: Account) -> Response:
    job = await _own_job(ctx, account_id, job_id)
    return page(request, ctx, "job.html", job=job, events_url=f"/gallery/job/{job.id}/events")


@router.get("/gallery/job/{job_id}/events")
async def job_events(job_id: str, ctx: Ctx, account_id: Account) -> Response:
    """The job's story as Server-Sent Events, ending with done (the new images' links),
    failed or cancelled."""
    job = await _own_job(ctx, account_id, job_id)
    # A job posted to a chat (Vary (Region)) is that chat's to confirm, not this page's.
    mark = job.delivery.frontend == FRONTEND
    response = StreamingResponse(
        _sse(ctx.client, job.id, mark=mark), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    return secured(response)


async def _sse(client: Client, job_id: str, *, mark: bool = True) -> AsyncIterator[str]:
    async with contextlib.aclosing(client.jobs.events(job_id)) as events:
        async for event in events:
            yield f"event: {event.kind.value}\ndata: {json.dumps(_event_data(event))}\n\n"
            if event.terminal:
                break
    # The page has shown the result (the delivery stream's loop would confirm it too).
    if mark:
        with contextlib.suppress(AtelierError):
            await client.jobs.mark_delivered(job_id)


def _event_data(event: JobEvent) -> dict[str, object]:
    data: dict[str, object] = {"kind": event.kind.value}
    if event.kind is EventKind.queued:
        data["position"] = event.position
    elif event.kind is EventKind.progress:
        data |= {"step": event.step, "total": event.total}
    elif event.kind is EventKind.done:
        data["images"] = [
            {"id": ref.image_id, "url": f"/gallery/image/{ref.image_id}",
             "thumb": f"/gallery/thumb/{ref.image_id}.webp", "seed": ref.seed}
            for ref in event.images
        ]
    elif event.terminal:
        data["reason"] = event.reason
    return data


async def _own_job(ctx: WebContext, account_id: int, job_id: str) -> JobRead:
    try:
        job = await ctx.store(
            lambda s: job_repo.get_job(session=s, job_id=job_id), read_only=True
        )
    except NotFound:
        job = None
    if job is None or job.account_id != account_id:
        raise NotFound("there is no such job of yours")
    return job


def _requester(session: Session, job: JobRead) -> Requester:
    """Who the new job is asked as: the identity behind the image's job (so the same
    account pays and the same NSFW choice holds), else any identity of the account."""
    found = accounts.list_identities(session=session, account_id=job.account_id)
    if not found:
        raise Conflict("this account has no chat identity to charge the job to")
    identity = next((i for i in found if i.id == job.identity_id), found[0])
    return Requester(
        platform=identity.platform, platform_user_id=identity.platform_user_id,
        nsfw_allowed=job.delivery.extra.get(NSFW_EXTRA_KEY) == "1",
    )

