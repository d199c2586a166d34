"""Mounting the gallery on the app: its routers (whose errors are pages: ``PageRoute``), static
files and the home page."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from core.signing import duration_text
from web.app import get_ctx
from web.context import WebContext
from web.gallery import account, actions, control, make, pages, vary, xyz
from web.gallery.common import WEB_DIR, page, secured
from web.session import HOME, NotSignedIn, session_account

Ctx = Annotated[WebContext, Depends(get_ctx)]


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.include_router(actions.router)
    app.include_router(control.router)
    app.include_router(make.router)
    app.include_router(xyz.router)
    app.include_router(account.router)
    app.include_router(vary.router)
    app.include_router(vary.submit_router)
    app.mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static")

    @app.get("/", include_in_schema=False)
    async def _home(request: Request, ctx: Ctx) -> Response:
        """Signed in: the gallery. Else: how to get a gallery link."""
        try:
            session_account(ctx, request)
        except NotSignedIn:
            return page(request, ctx, "home.html",
                        valid_for=duration_text(ctx.settings.gallery_link_ttl_s))
        return secured(RedirectResponse(HOME, status_code=303))
