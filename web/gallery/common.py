"""What the gallery's routes share: templates, the page-error type, security headers, and
reading one's own images (another account's image is "not found", never "forbidden")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from core.errors import Forbidden, InvalidRequest, NotFound
from storage import gallery as store
from storage.db import transaction
from storage.gallery import ImageRead
from web.context import WebContext
from web.session import csrf_token

T = TypeVar("T")
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


class PageError(Exception):
    """Shown to the person as a plain page with this status and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def error_page(request: Request, exc: PageError) -> Response:
    response = templates.TemplateResponse(
        request, "error.html", {"message": exc.message, "status": exc.status},
        status_code=exc.status,
    )
    return secured(response)


async def db(ctx: WebContext, fn: Callable[[Session], T], *, write: bool = False) -> T:
    """Run ``fn`` in a session off the event loop (a committed transaction when ``write``)."""

    def work() -> T:
        if write:
            with transaction(ctx.sessions) as session:
                return fn(session)
        with ctx.sessions() as session:
            return fn(session)

    return await asyncio.to_thread(work)


async def own_image(ctx: WebContext, account_id: int, image_id: int) -> ImageRead:
    """The account's image; a missing, deleted or someone else's image is the same 404."""
    try:
        return await db(
            ctx, lambda s: store.get_image(session=s, image_id=image_id, account_id=account_id)
        )
    except (NotFound, Forbidden):
        raise PageError(404, "there is no such image in your gallery") from None


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
