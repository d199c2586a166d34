"""A1111's X/Y/Z plot script over ``/sdapi/v1/txt2img`` (``script_name: "x/y/z plot"``,
``script_args`` in the script's order): every cell an ordinary job (charged as the grid's sum,
each in the gallery with its infotext), the answer A1111's: the labelled grid first, then the
cells' own images when ``include_lone_images`` is set."""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import replace

from fastapi.responses import JSONResponse

from cluster.events import EventKind
from cluster.grid import quote_grid, sheet_png, submit_grid
from core.errors import InvalidRequest
from core.grid import Axis, AxisKind, a1111_script, expand
from core.infotext import read_png_infotext
from core.jobs import DeliveryTarget
from core.request import GenerationRequest
from web.api.common import Caller
from web.api.sdapi_models import (
    FieldError,
    GenerationResponse,
    Txt2ImgPayload,
    checkpoint_name,
    info_json,
    parameters_echo,
)
from web.api.sdapi_progress import ProgressBoard, Running
from web.context import WebContext

WEB = "web"


async def generate_grid(
    payload: Txt2ImgPayload, base: GenerationRequest, who: Caller, ctx: WebContext,
    progress: ProgressBoard,
) -> JSONResponse:
    """Run ``base`` (the payload's request, model resolved and fitted) as the script's grid."""
    try:
        script = a1111_script(payload.script_args, ctx.client.styles)
    except InvalidRequest as exc:
        raise FieldError("script_args", exc.message) from None
    axes = tuple(
        a if a.kind is not AxisKind.model else _models(a) for a in script.axes
    )
    try:
        grid = expand(base, axes, max_cells=ctx.settings.grid.max_cells)
    except InvalidRequest as exc:
        raise FieldError("script_args", exc.message) from None
    quote = await quote_grid(ctx.client, grid, who.requester)
    key = f"sdapi:{who.key.identity_id}:{uuid.uuid4()}"
    delivery = DeliveryTarget(frontend=WEB, extra={"via": "sdapi", "key": who.key.prefix})
    submitted = await submit_grid(ctx.client, quote, who.requester, lambda _: delivery, key)
    first = await ctx.client.job(submitted.job_ids[0])
    entry = Running(job_id=first.id, job_count=len(submitted.job_ids),
                    timestamp=first.created_at.strftime("%Y%m%d%H%M%S"))
    progress.start(who.key.id, entry)
    try:
        entry.running = True
        finals = await asyncio.gather(*(ctx.client.wait(j) for j in submitted.job_ids))
    finally:
        progress.finish(who.key.id, entry)
    for job_id in submitted.job_ids:
        await ctx.client.mark_delivered(job_id)
    if all(f.kind is not EventKind.done for f in finals):
        reason = next((f.reason for f in finals if f.reason), None) or "the grid failed"
        return JSONResponse({"error": "job_failed", "detail": reason,
                             "job_id": submitted.job_ids[0]}, status_code=500)
    sheet = await sheet_png(ctx.client, axes, submitted.job_ids)
    pngs = [sheet]
    cells: list[bytes] = []
    seeds: list[int] = []
    for final in finals:
        for ref in sorted(final.images, key=lambda r: r.index)[:1]:
            cells.append(await ctx.client.image_bytes(ref))
            seeds.append(ref.seed)
    if script.include_lone_images:
        pngs.extend(cells)
    infotexts = [read_png_infotext(p) or "" for p in pngs]
    info = info_json(
        quote.requests[0], seeds=seeds, infotexts=infotexts, model=quote.requests[0].model or "",
        job_id=first.id, created_at=first.created_at,
    )
    images = [base64.b64encode(p).decode() for p in pngs] if payload.send_images else []
    body = GenerationResponse(images=images, parameters=parameters_echo(payload), info=info)
    return JSONResponse(body.model_dump())


def _models(axis: Axis) -> Axis:
    """A Checkpoint name axis with A1111's file names ("sd15.safetensors [hash]") as ours."""
    names = tuple(checkpoint_name(str(v)) for v in axis.values)
    return replace(axis, values=names, labels=names)
