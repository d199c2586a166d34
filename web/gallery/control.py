"""An image's control map (the preview of what its ControlNet followed: the edges of the
person's picture), shown on its page; made once off the event loop and kept
(``cluster.previews``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from sqlmodel import Session

from core.errors import NotFound
from storage import jobs as job_repo
from storage.jobs import JobRead
from web.app import get_ctx
from web.context import WebContext
from web.gallery.actions import PRIVATE_CACHE
from web.gallery.common import PageRoute, own_image, secured
from web.session import current_account

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]


@router.get("/gallery/image/{image_id:int}/control.png")
async def control_map(image_id: int, ctx: Ctx, account_id: Account) -> Response:
    """The control map the image's ControlNet followed; 404 for an image made without one."""
    image = await own_image(ctx, account_id, image_id)

    def read(s: Session) -> JobRead:
        return job_repo.get_job(session=s, job_id=image.job_id)

    job = await ctx.store(read, read_only=True)
    png = await ctx.client.jobs.control_preview(job.request)
    if png is None:
        raise NotFound("this image was made without a control picture")
    response = Response(png, media_type="image/png")
    response.headers["Cache-Control"] = PRIVATE_CACHE
    return secured(response)
