"""``/sdapi/v1``: the AUTOMATIC1111 API subset, with A1111's response shapes, over Atelier's
queue. HTTP Basic auth (A1111's ``--api-auth``): any user name, the API key as the password.
A generation call waits for its job (delivered to the "web" front end) and returns it."""

from __future__ import annotations

import base64
import contextlib
import uuid
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse

from cluster.broker import BrokerUnavailable
from cluster.events import EventKind
from core.control import PREPROCESSORS
from core.errors import AtelierError, InvalidRequest
from core.infotext import parse_infotext, read_png_infotext
from core.jobs import DeliveryTarget
from core.offload import run_heavy
from core.request import SCHEDULERS
from storage import apikeys
from web.api.common import Caller, SdApiRoute, caller
from web.api.sdapi_grid import generate_grid
from web.api.sdapi_models import (
    FieldError,
    GenerationResponse,
    Img2ImgPayload,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgPayload,
    checkpoint_name,
    decode_b64_image,
    fit_to_model,
    info_json,
    infotext_items,
    is_xyz_script,
    parameters_echo,
    to_generation_request,
)
from web.api.sdapi_progress import ProgressBoard, Running
from web.app import get_ctx
from web.context import WebContext

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=SdApiRoute)
# The ControlNet extension's own routes, which clients ask before they send a unit.
controlnet_router = APIRouter(
    prefix="/controlnet", tags=["AUTOMATIC1111 API"], route_class=SdApiRoute
)
WEB = "web"


def board(request: Request) -> ProgressBoard:
    found: ProgressBoard | None = getattr(request.app.state, "sdapi_progress", None)
    if found is None:
        found = request.app.state.sdapi_progress = ProgressBoard()
    return found


async def _generate(
    payload: Txt2ImgPayload, who: Caller, ctx: WebContext, progress: ProgressBoard
) -> JSONResponse:
    # 1. Translate (FieldError names the A1111 field), then submit as any front end does.
    request = await run_heavy(
        to_generation_request, payload, limits=ctx.settings.limits, model=who.key.model
    )
    if request.model is not None and request.model not in ctx.client.models:
        field = "override_settings.sd_model_checkpoint"
        if not payload.override_settings.get("sd_model_checkpoint"):
            field = "sd_model_checkpoint"
        raise FieldError(field, f"unknown model {request.model!r}; see /sdapi/v1/sd-models")
    # The model it runs on (the current one, /options, when none is named) bounds the size.
    request = await ctx.client.runnable.with_default(request)
    spec = ctx.client.models.get(request.model)
    request = fit_to_model(request, max_width=spec.max_width, max_height=spec.max_height)
    if is_xyz_script(payload.script_name):
        return await generate_grid(payload, request, who, ctx, progress)
    delivery = DeliveryTarget(frontend=WEB, extra={"via": "sdapi", "key": who.key.prefix})
    quote = await ctx.client.jobs.admit(
        request, who.requester, f"sdapi:{who.key.identity_id}:{uuid.uuid4()}"
    )
    submitted = await ctx.client.jobs.submit(quote, delivery)
    job = await ctx.client.jobs.job(submitted.job_id)
    entry = Running(
        job_id=job.id, job_count=submitted.images_out,
        timestamp=job.created_at.strftime("%Y%m%d%H%M%S"),
    )
    # 2. Wait for it, keeping /progress up to date.
    progress.start(who.key.id, entry)
    try:
        async with contextlib.aclosing(ctx.client.jobs.events(job.id)) as events:
            async for event in events:
                if event.kind in (EventKind.started, EventKind.progress):
                    entry.running = True
                if event.kind is EventKind.progress and event.total:
                    entry.step, entry.total = event.step or 0, event.total
                if event.terminal:
                    final = event
                    break
            else:
                raise RuntimeError(f"job {job.id}: events ended without an outcome")
    finally:
        progress.finish(who.key.id, entry)
    # 3. The result in A1111's shape; an interrupted job (cancelled, refunded) has no images.
    if final.kind is EventKind.failed:
        await ctx.client.jobs.mark_delivered(job.id)
        return JSONResponse(
            {"error": "job_failed", "detail": final.reason or "the job failed",
             "job_id": job.id}, status_code=500,
        )
    pngs = [await ctx.client.jobs.image_bytes(ref) for ref in final.images]
    job = await ctx.client.jobs.job(job.id)
    infotexts, images = await run_heavy(_encoded, pngs, payload.send_images)
    info = info_json(
        job.request,
        seeds=[ref.seed for ref in final.images],
        infotexts=infotexts,
        model=job.request.model or "",
        job_id=job.id,
        created_at=job.created_at,
    )
    body = GenerationResponse(images=images, parameters=parameters_echo(payload), info=info)
    await ctx.client.jobs.mark_delivered(job.id)
    return JSONResponse(body.model_dump())


def _encoded(pngs: list[bytes], send_images: bool) -> tuple[list[str], list[str]]:
    """Each PNG's infotext and (``send_images``) its base64: work for a worker thread."""
    infotexts = [read_png_infotext(p) or "" for p in pngs]
    return infotexts, [base64.b64encode(p).decode() for p in pngs] if send_images else []


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(
    request: Request,
    payload: Txt2ImgPayload,
    who: Caller = Depends(caller),
    ctx: WebContext = Depends(get_ctx),
) -> JSONResponse:
    """Text to image; waits for the images (base64 PNGs carrying their infotext)."""
    return await _generate(payload, who, ctx, board(request))


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(
    request: Request,
    payload: Img2ImgPayload,
    who: Caller = Depends(caller),
    ctx: WebContext = Depends(get_ctx),
) -> JSONResponse:
    """Image to image (init_images[0], denoising_strength) or inpainting (with a mask)."""
    return await _generate(payload, who, ctx, board(request))


@router.get("/progress", response_model=ProgressResponse)
async def progress(
    request: Request, who: Caller = Depends(caller)
) -> ProgressResponse:
    """The caller's oldest waiting generation: fraction done, seconds left, sampling steps.
    ``current_image`` stays null: Atelier sends no live previews."""
    return board(request).report(who.key.id)


async def _cancel_all(request: Request, who: Caller, ctx: WebContext, *, skip: bool) -> None:
    for entry in board(request).all(who.key.id):
        entry.skipped, entry.interrupted = skip, not skip
        # Conflict: it finished meanwhile; the waiting call returns its images as usual.
        with contextlib.suppress(AtelierError, BrokerUnavailable):
            await ctx.client.jobs.cancel(entry.job_id, who.requester)


@router.post("/interrupt")
async def interrupt(
    request: Request, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, Any]:
    """Stop the caller's generations: each is cancelled and refunded; the waiting call
    returns with no images."""
    await _cancel_all(request, who, ctx, skip=False)
    return {}


@router.post("/skip")
async def skip(
    request: Request, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, Any]:
    """As interrupt: Atelier renders a call's whole batch at once, so there is no single
    image to skip."""
    await _cancel_all(request, who, ctx, skip=True)
    return {}


@router.get("/sd-models")
async def sd_models(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> list[dict[str, Any]]:
    """The registry's models some worker can load (what a call may use); ``title`` is what
    sd_model_checkpoint takes."""
    here = set(await ctx.client.runnable.available())
    return [
        {"title": spec.name, "model_name": spec.name, "hash": None, "sha256": None,
         "filename": spec.location, "config": None}
        for spec in ctx.client.models.all() if spec.name in here
    ]


@router.get("/loras")
async def loras(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> list[dict[str, Any]]:
    """The LoRA catalogue; ``<lora:NAME:0.8>`` in a prompt applies one (A1111's shape)."""
    return [
        {"name": a.name, "alias": a.name, "path": a.location,
         "metadata": {"family": a.family, "models": list(a.models),
                      "default_weight": a.default_weight,
                      "triggers": list(a.triggers), "description": a.description}}
        for a in ctx.client.models.adapters.values() if a.kind == "lora"
    ]


@controlnet_router.get("/model_list")
async def controlnet_models(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, Any]:
    """The ControlNets in the catalogue (a unit's ``model``)."""
    names = [a.name for a in ctx.client.models.adapters.values() if a.kind == "controlnet"]
    return {"model_list": names}


@controlnet_router.get("/module_list")
async def controlnet_modules(who: Caller = Depends(caller)) -> dict[str, Any]:
    """The preprocessors Atelier runs (a unit's ``module``)."""
    return {"module_list": list(PREPROCESSORS)}


@router.get("/embeddings")
async def embeddings(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, Any]:
    """The embeddings, by the token that applies one in a prompt (A1111's shape)."""
    loaded = {
        a.prompt_token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": a.family,
                         "shape": None, "vectors": None}
        for a in ctx.client.models.adapters.values() if a.kind == "embedding"
    }
    return {"loaded": loaded, "skipped": {}}


@router.get("/samplers")
async def samplers(who: Caller = Depends(caller)) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SCHEDULERS]


@router.get("/schedulers")
async def schedulers(who: Caller = Depends(caller)) -> list[dict[str, Any]]:
    """Automatic (the sampler's own schedule) and Karras (for the samplers that have it)."""
    return [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
         "need_inner_model": False},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
         "need_inner_model": False},
    ]


@router.get("/upscalers")
async def upscalers(who: Caller = Depends(caller)) -> list[dict[str, Any]]:
    """None: upscaling is a chat button (U1), not part of this API yet."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
             "scale": 1}]


@router.get("/prompt-styles")
async def prompt_styles(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> list[dict[str, Any]]:
    """The curated styles; ``styles: ["watercolor"]`` applies one."""
    return [
        {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative}
        for s in ctx.client.styles.all()
    ]


@router.get("/options")
async def get_options(
    who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> dict[str, Any]:
    """The options Atelier has: the checkpoint a call without an override gets (the key's
    choice, else the default model: the configured one, or the demo model when no worker can
    load that), PNG output."""
    model = who.key.model or await ctx.client.runnable.default()
    return {
        "sd_model_checkpoint": model,
        "sd_checkpoint_hash": None,
        "samples_format": "png",
        "enable_pnginfo": True,
        "CLIP_stop_at_last_layers": 1,
    }


@router.post("/options")
async def set_options(
    options: dict[str, Any] = Body(...),
    who: Caller = Depends(caller),
    ctx: WebContext = Depends(get_ctx),
) -> None:
    """Set ``sd_model_checkpoint`` for this key (what later calls use unless their
    override_settings name one); other options are ignored, as A1111 ignores unknown ones."""
    if "sd_model_checkpoint" not in options:
        return None
    title = options["sd_model_checkpoint"]
    if not isinstance(title, str) or not title.strip():
        raise FieldError("sd_model_checkpoint", f"must be a model title, got {title!r}")
    name = checkpoint_name(title)
    if name not in ctx.client.models:
        raise FieldError(
            "sd_model_checkpoint", f"unknown model {title!r}; choose one of: "
            f"{', '.join(ctx.client.models.names())}"
        )
    spec = ctx.client.models.get(name)
    await ctx.store(lambda s: apikeys.set_key_model(session=s, key_id=who.key.id, model=spec.name))
    return None


def _png_info(image: str, max_bytes: int) -> PngInfoResponse:
    """What /png-info answers for a base64 image (work for a worker thread: megabytes of
    base64 to decode, a text chunk to parse)."""
    data = decode_b64_image(image, "image")
    if len(data) > max_bytes:
        raise FieldError("image", f"is {len(data)} bytes; the limit is {max_bytes}")
    text = read_png_infotext(data)
    if text is None:
        return PngInfoResponse(info="", items={}, parameters={})
    try:
        parameters = infotext_items(parse_infotext(text))
    except InvalidRequest:
        parameters = {"Prompt": text}
    return PngInfoResponse(info=text, items={"parameters": text}, parameters=parameters)


@router.post("/png-info", response_model=PngInfoResponse)
async def png_info(
    body: PngInfoRequest, who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)
) -> PngInfoResponse:
    """The infotext of a PNG (read from its text chunks; no pixel is decoded)."""
    return await run_heavy(_png_info, body.image, ctx.settings.limits.max_upload_bytes)
