"""REST API ``/api/v1``: submit a job (Idempotency-Key header), read it, follow its events as
Server-Sent Events, cancel it, list and fetch gallery images. Auth: ``Authorization: Bearer``."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session

from cluster.events import JobEvent, image_ref
from core.adapters import AdapterRef
from core.errors import AtelierError, Forbidden, NotFound
from core.images import validate_image, validate_mask
from core.jobs import DeliveryTarget, JobStatus
from core.offload import run_heavy
from core.request import GenerationRequest, JobKind
from core.settings import Limits
from storage import gallery
from storage.gallery import ImagePage, ImageRead
from storage.jobs import JobRead
from web.api.common import ApiRoute, Caller, caller
from web.api.sdapi_models import FieldError, check_length
from web.app import get_ctx
from web.context import WebContext
from web.errors import ERROR_RESPONSES

router = APIRouter(
    prefix="/api/v1", tags=["api v1"], route_class=ApiRoute, responses=ERROR_RESPONSES
)
WEB = "web"


class JobSubmit(BaseModel):
    """A generation job. Images are base64 (a ``data:`` URL prefix is fine). Size, steps,
    guidance and scheduler left out are the model's defaults (``models.toml``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative: str = ""
    styles: list[str] = Field(default_factory=list)
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    seed: int | None = None
    count: int = 1
    model: str | None = None
    kind: JobKind = JobKind.txt2img
    init_image: str | None = None
    mask: str | None = None
    strength: float = 0.75
    raw: bool = False
    # LoRAs by catalogue name (/sdapi/v1/loras) and weight (null: the catalogue's default);
    # ``<lora:name:w>`` tags in the prompt work too.
    loras: list[AdapterRef] = Field(default_factory=list)


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    cost: int
    created: bool  # False: the Idempotency-Key was seen before; nothing charged again
    position: int | None
    images_out: int


class ImageOut(BaseModel):
    id: int
    index: int
    seed: int
    width: int
    height: int
    prompt: str
    negative: str
    styles: list[str]
    model: str
    infotext: str
    created_at: datetime
    png_url: str


class JobOut(BaseModel):
    id: str
    status: JobStatus
    cost: int
    error: str | None
    request: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    images: list[ImageOut]
    loras: list[AdapterRef]  # as resolved: each LoRA's weight, the default filled in


class ImageList(BaseModel):
    items: list[ImageOut]
    next_cursor: str | None


def _image_out(image: ImageRead) -> ImageOut:
    return ImageOut(
        **image.model_dump(include=set(ImageOut.model_fields) - {"png_url"}),
        png_url=f"/api/v1/images/{image.id}/png",
    )


def _b64(text: str, field: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None


def to_request(body: JobSubmit, limits: Limits) -> GenerationRequest:
    """Our request from the REST body; the texts' lengths first, then uploads pass the
    bomb-safe checks (seconds for a big image: call it off the event loop)."""
    check_length(body.prompt, "prompt", limits.max_prompt_chars)
    check_length(body.negative, "negative", limits.max_prompt_chars)
    fields = body.model_dump(exclude={"init_image", "mask", "loras"})
    fields["adapters"] = tuple(body.loras)
    for name, check in (("init_image", validate_image), ("mask", validate_mask)):
        raw = getattr(body, name)
        if raw is not None:
            try:
                fields[name] = check(
                    _b64(raw, name), max_bytes=limits.max_upload_bytes,
                    max_pixels=limits.max_upload_pixels, purpose=name,
                ).png
            except AtelierError as exc:
                raise FieldError(name, exc.message) from None
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        # The kind's own check has no field of its own: it is about the missing input.
        whole = "mask" if "mask" in message and "init image" not in message else "init_image"
        field = ".".join(str(p) for p in err["loc"]) or whole
        raise FieldError(field, message) from None


async def _own_job(ctx: WebContext, who: Caller, job_id: str) -> JobRead:
    """The caller's job; NotFound (never Forbidden) for another account's, to reveal nothing."""
    job = await ctx.client.jobs.job(job_id)
    if job.account_id != who.key.account_id:
        raise NotFound(f"job {job_id} does not exist")
    return job


async def _job_out(ctx: WebContext, job: JobRead) -> JobOut:
    images: list[ImageRead] = []
    if job.status is JobStatus.succeeded:
        images = await ctx.store(
            lambda s: gallery.list_job_images(session=s, job_id=job.id), read_only=True
        )
    return JobOut(
        id=job.id,
        status=job.status,
        cost=job.cost,
        error=job.error,
        request=job.request.model_dump(mode="json", exclude={"init_image", "mask"}),
        loras=list(job.request.adapters),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        images=[_image_out(i) for i in images],
    )


async def _delivered(ctx: WebContext, job: JobRead) -> None:
    # A web job is delivered once the API has shown its outcome; until then the dispatcher
    # re-announces it (harmless: the result is in the store either way).
    if job.delivery.frontend == WEB and job.status.finished and job.delivered_at is None:
        await ctx.client.jobs.mark_delivered(job.id)


@router.post("/jobs", status_code=201, response_model=JobAccepted)
async def submit_job(
    body: JobSubmit,
    response: Response,
    idempotency_key: str | None = Header(default=None, max_length=120),
    who: Caller = Depends(caller),
    ctx: WebContext = Depends(get_ctx),
) -> JobAccepted:
    """Queue a job, charged exactly as a chat job. The same ``Idempotency-Key`` again returns
    the first job (200) and charges nothing more."""
    request = await run_heavy(to_request, body, ctx.settings.limits)
    # Scoped to the identity, so two callers' keys never meet.
    key = f"api:{who.key.identity_id}:{idempotency_key or uuid.uuid4()}"
    delivery = DeliveryTarget(frontend=WEB, extra={"via": "api", "key": who.key.prefix})
    quote = await ctx.client.jobs.admit(request, who.requester, key)
    job = await ctx.client.jobs.submit(quote, delivery)
    if not job.created:
        response.status_code = 200
    return JobAccepted(
        job_id=job.job_id, status=job.status, cost=job.cost, created=job.created,
        position=job.position, images_out=job.images_out,
    )


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> JobOut:
    """A job: status, cost, request, and its images once it succeeded."""
    job = await _own_job(ctx, who, job_id)
    out = await _job_out(ctx, job)
    await _delivered(ctx, job)
    return out


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    job_id: str, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, str]:
    """Cancel: a queued job at once (refunded); a running one is interrupted (then refunded)."""
    await _own_job(ctx, who, job_id)
    status = await ctx.client.jobs.cancel(job_id, who.requester)
    return {"job_id": job_id, "status": status.value}


def _sse(event: JobEvent) -> str:
    data = {k: v for k, v in event.to_fields().items() if k not in ("v", "delivery")}
    if "images" in data:
        data["images"] = json.loads(data["images"])
    return f"event: {event.kind.value}\ndata: {json.dumps(data)}\n\n"


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> StreamingResponse:
    """Server-Sent Events: queued/started, progress (step, total), then done, failed or
    cancelled, then the stream ends."""
    await _own_job(ctx, who, job_id)

    async def stream() -> AsyncIterator[str]:
        async with contextlib.aclosing(ctx.client.jobs.events(job_id)) as events:
            async for event in events:
                yield _sse(event)
                if event.terminal:
                    await _delivered(ctx, await ctx.client.jobs.job(job_id))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/images", response_model=ImageList)
async def list_images(
    before: str | None = None,
    limit: int = Query(default=24, ge=1, le=gallery.MAX_PAGE),
    q: str | None = Query(default=None, description="words that must all be in the prompt"),
    style: str | None = None,
    model: str | None = None,
    who: Caller = Depends(caller),
    ctx: WebContext = Depends(get_ctx),
) -> ImageList:
    """The caller's gallery, newest first; pass ``next_cursor`` as ``before`` for the next page."""
    page: ImagePage = await ctx.store(
        lambda s: gallery.list_images(
            session=s, account_id=who.key.account_id, before=before, limit=limit, style=style,
            model=model, search=q,
        ),
        read_only=True,
    )
    return ImageList(items=[_image_out(i) for i in page.items], next_cursor=page.next_cursor)


async def _own_image(ctx: WebContext, who: Caller, image_id: int) -> ImageRead:
    def read(s: Session) -> ImageRead:
        try:
            return gallery.get_image(session=s, image_id=image_id, account_id=who.key.account_id)
        except (Forbidden, NotFound):  # the same answer for both, revealing nothing
            raise NotFound(f"image {image_id} does not exist") from None

    return await ctx.store(read, read_only=True)


@router.get("/images/{image_id}", response_model=ImageOut)
async def get_image(
    image_id: int, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> ImageOut:
    """One gallery image's parameters."""
    return _image_out(await _own_image(ctx, who, image_id))


@router.get("/images/{image_id}/png", response_class=Response)
async def get_image_png(
    image_id: int, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> Response:
    """The PNG, with its A1111 infotext."""
    image = await _own_image(ctx, who, image_id)
    png = await ctx.client.jobs.image_bytes(image_ref(image))
    return Response(png, media_type="image/png")
