"""The gallery's X/Y/Z grid: from an image's page, its settings as the base and up to three
axes (``cfg=3,7,11``), charged as the sum of its cells; then a page that lists the cells and,
once every cell ended, shows the labelled contact sheet (reloading itself until then: no
script needed)."""

from __future__ import annotations

import json
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response

from cluster.grid import grid_job_ids, quote_grid, sheet_png, submit_grid
from core.errors import AtelierError, Conflict, NotFound
from core.grid import expand, ordered_axes
from core.jobs import DeliveryTarget
from storage import jobs as job_repo
from storage.jobs import JobRead
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, own_image, page, secured
from web.gallery.deliveries import FRONTEND
from web.gallery.make import _own_job, _requester, again_request
from web.session import check_csrf, current_account

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]
Axis = Annotated[str, Form(max_length=300)]


@router.post("/gallery/image/{image_id:int}/grid")
async def make_grid(
    request: Request, image_id: int, ctx: Ctx, account_id: Account,
    csrf: Annotated[str, Form()] = "", nonce: Annotated[str, Form(max_length=64)] = "",
    x: Axis = "", y: Axis = "", z: Axis = "",
) -> Response:
    """A grid over the image's own settings (its seed kept, one image per cell)."""
    check_csrf(ctx, request, csrf)
    image = await own_image(ctx, account_id, image_id)
    job = await ctx.store(
        lambda s: job_repo.get_job(session=s, job_id=image.job_id), read_only=True
    )
    requester = await ctx.store(lambda s: _requester(s, job), read_only=True)
    given = {name: value.strip() for name, value in (("x", x), ("y", y), ("z", z))
             if value.strip()}
    key = f"web:{account_id}:{image_id}:{nonce or secrets.token_urlsafe(12)}:grid"
    # Our errors become the gallery's error page with their status (PageRoute).
    axes = ordered_axes(given, ctx.client.styles)
    base = again_request(job, image, keep_seed=True)
    grid = expand(base, axes, max_cells=ctx.settings.grid.max_cells)
    quote = await quote_grid(ctx.client, grid, requester)
    extra = {"grid": key, "cells": str(len(grid.cells)), "axes": json.dumps(given)}
    submitted = await submit_grid(
        ctx.client, quote, requester, lambda _: DeliveryTarget(frontend=FRONTEND, extra=extra),
        key,
    )
    return secured(RedirectResponse(f"/gallery/grid/{submitted.job_ids[0]}", status_code=303))


async def _cells(
    ctx: WebContext, account_id: int, job_id: str
) -> tuple[dict[str, str], list[JobRead]]:
    first = await _own_job(ctx, account_id, job_id)
    extra = first.delivery.extra
    if not extra.get("grid"):
        raise NotFound("that job is not part of a grid")
    ids = await grid_job_ids(ctx.client, extra["grid"], int(extra.get("cells", "0") or 0))
    jobs = [await ctx.client.job(i) for i in ids]
    return extra, jobs


@router.get("/gallery/grid/{job_id}")
async def grid_page(request: Request, job_id: str, ctx: Ctx, account_id: Account) -> Response:
    extra, jobs = await _cells(ctx, account_id, job_id)
    done = sum(1 for j in jobs if j.status.finished)
    return page(request, ctx, "xyz.html", jobs=jobs, done=done, first=jobs[0],
                axes=json.loads(extra.get("axes", "{}")), complete=done == len(jobs))


@router.get("/gallery/grid/{job_id}/sheet.png")
async def grid_sheet(job_id: str, ctx: Ctx, account_id: Account) -> Response:
    extra, jobs = await _cells(ctx, account_id, job_id)
    if not all(j.status.finished for j in jobs):
        raise Conflict("the grid is not finished yet")
    try:
        axes = ordered_axes(json.loads(extra.get("axes", "{}")), ctx.client.styles)
    except (AtelierError, ValueError) as exc:
        raise RuntimeError(f"the grid's axes cannot be read back: {exc}") from exc
    png = await sheet_png(ctx.client, axes, tuple(j.id for j in jobs))
    return secured(Response(png, media_type="image/png",
                            headers={"Cache-Control": "private, max-age=3600"}))


