"""What the gallery's routes share: templates, the route class that shows our errors as a page
(with the status of the one map, ``web.errors``), security headers, and reading one's own images
(another account's image is "not found", never "forbidden")."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from core.errors import AtelierError, Forbidden, InvalidRequest, NotFound
from storage import gallery as store
from storage.gallery import ImageRead
from web.context import WebContext
from web.errors import status_of
from web.session import csrf_token

WEB_DIR = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=str(WEB_DIR / "templates"))

# Everything the pages load comes from this origin; nothing may frame them. Inline scripts
# are refused, so an escaped-but-misplaced prompt could still not run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Addresses never go to another site. Not "no-referrer": Chromium then sends form posts
    # with "Origin: null", which the CSRF check (rightly) refuses.
    "Referrer-Policy": "same-origin",
}


class PageRoute(APIRoute):
    """A gallery route: a project error it raises (its dependencies' too: ``NotSignedIn``) is
    shown as the error page, with the status ``web.errors.status_of`` gives it. A request that
    does not parse is left to the app's JSON handler, as before."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except AtelierError as exc:
                return error_page(request, exc)

        return run


def secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def page(
    request: Request, ctx: WebContext, name: str, status: int = 200, **values: Any
) -> Response:
    """Render a template with the session's CSRF token and the security headers."""
    values.setdefault("csrf", csrf_token(ctx, request))
    response = templates.TemplateResponse(request, name, values, status_code=status)
    return secured(response)


def error_page(request: Request, exc: AtelierError) -> Response:
    """The plain page that shows one error's line, with its status from the one map."""
    status = status_of(exc)
    response = templates.TemplateResponse(
        request, "error.html", {"message": exc.message, "status": status}, status_code=status,
    )
    return secured(response)


async def own_image(ctx: WebContext, account_id: int, image_id: int) -> ImageRead:
    """The account's image; a missing, deleted or someone else's image is the same 404."""
    try:
        return await ctx.store(
            lambda s: store.get_image(session=s, image_id=image_id, account_id=account_id),
            read_only=True,
        )
    except (NotFound, Forbidden):
        raise NotFound("there is no such image in your gallery") from None


def parse_day(text: str | None, name: str, *, end: bool = False) -> datetime | None:
    """A YYYY-MM-DD filter as a UTC instant (the day's start; the next day's with ``end``)."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-03-02, got {text[:20]!r}") from None
    if end:
        day += timedelta(days=1)
    return datetime.combine(day, time(0), tzinfo=UTC)


def html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)
