"""The one map from our errors to HTTP statuses (``web.errors.status_of``): each error type's
status, and the same status from an API route (JSON) and a gallery route (the error page)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI

import core.errors as errors
from core.errors import AtelierError
from web.api.common import ApiRoute
from web.errors import FieldError, status_of
from web.gallery.common import PageRoute
from web.session import NotSignedIn

EXPECTED: dict[type[AtelierError], int] = {
    errors.AtelierError: 400,
    errors.InvalidRequest: 422,
    errors.PromptTooLong: 422,
    errors.ImageRejected: 422,
    errors.UnreadableImage: 422,
    errors.ContentBlocked: 422,
    errors.InsufficientCredits: 402,
    errors.RateLimited: 429,
    errors.TooManyJobs: 429,
    errors.NotFound: 404,
    errors.Forbidden: 403,
    errors.AccountBlocked: 403,
    errors.Conflict: 409,
    errors.ModelUnavailable: 400,
    errors.ConfigError: 400,
    errors.DatabaseNotMigrated: 400,
    errors.Unauthorized: 401,
    # The web's own: a request field at fault, and a gallery without its session cookie.
    FieldError: 422,
    NotSignedIn: 401,
}


def _instance(cls: type[AtelierError]) -> AtelierError:
    if cls is FieldError:
        return FieldError("steps", "steps must be at most 150, got 900")
    return cls(f"a {cls.__name__} for the test")


def test_every_error_of_core_is_in_the_table() -> None:
    # A new error in core.errors must be given its status here (and in web.errors.STATUS).
    found = {
        value for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, AtelierError)
    }
    assert found == {cls for cls in EXPECTED if cls.__module__ == "core.errors"}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda cls: cls.__name__)
def test_each_error_has_its_status(cls: type[AtelierError]) -> None:
    assert status_of(_instance(cls)) == EXPECTED[cls]


def _app() -> FastAPI:
    """An API route and a gallery route that raise the error their path names, and no app-wide
    handler: the route classes answer with the map themselves."""
    by_name = {cls.__name__: cls for cls in EXPECTED}
    api = APIRouter(route_class=ApiRoute)
    pages = APIRouter(route_class=PageRoute)

    @api.get("/api/{name}")
    async def api_raise(name: str) -> None:
        raise _instance(by_name[name])

    @pages.get("/page/{name}")
    async def page_raise(name: str) -> None:
        raise _instance(by_name[name])

    app = FastAPI()
    app.include_router(api)
    app.include_router(pages)
    return app


async def test_api_and_gallery_routes_answer_each_error_with_the_same_status() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for cls, status in EXPECTED.items():
            error = _instance(cls)
            api = await http.get(f"/api/{cls.__name__}")
            assert api.status_code == status, (cls, api.text)
            assert api.json()["error"] == error.code and api.json()["detail"] == error.message
            page = await http.get(f"/page/{cls.__name__}")
            assert page.status_code == status, (cls, page.text)
            assert page.headers["content-type"].startswith("text/html")
            assert error.message in page.text and f"<h1>{status}</h1>" in page.text
            assert page.headers["X-Frame-Options"] == "DENY"  # the gallery's security headers
