"""The FastAPI application: ``create_app(ctx)`` builds it over a ``WebContext`` and includes
every router (the gallery pages, the REST API). Routes reach the context through ``get_ctx``."""

from __future__ import annotations

from fastapi import FastAPI, Request

from web.context import WebContext
from web.errors import install as install_error_handlers
from web.limits import BodyLimit
from web.ratelimit import PerAddressLimit, RateLimiter, rate_counter_for


def get_ctx(request: Request) -> WebContext:
    """FastAPI dependency: the ``WebContext`` the app was created with."""
    ctx: WebContext = request.app.state.ctx
    return ctx


def create_app(ctx: WebContext) -> FastAPI:
    """The whole web app over ``ctx`` (stored as ``app.state.ctx``)."""
    app = FastAPI(title="Atelier", version="1", docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx
    # The composition root passes the counter; a context built without one (tests, benches)
    # counts beside the client's broker.
    rates = ctx.rates if ctx.rates is not None else rate_counter_for(ctx.client.broker)
    app.state.limiter = RateLimiter(rates, ctx.settings.web_rate)
    app.add_middleware(PerAddressLimit, limiter=app.state.limiter)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=ctx.settings.web_max_body_bytes)
    _include_routers(app)
    return app


def _include_routers(app: FastAPI) -> None:
    # Each front of the web app adds its router here (one line each, so merges stay easy).
    from web.api.account import router as api_account_router
    from web.api.sdapi import controlnet_router
    from web.api.sdapi import router as sdapi_router
    from web.api.v1 import router as api_v1_router
    from web.gallery.routes import install as install_gallery
    from web.health import router as health_router

    app.include_router(health_router)
    app.include_router(api_v1_router)
    app.include_router(api_account_router)
    app.include_router(sdapi_router)
    app.include_router(controlnet_router)
    install_gallery(app)
