"""The gallery's browser session: a signed link is exchanged for a signed, expiring, HttpOnly
cookie naming the account; forms carry a CSRF token derived from that cookie."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from fastapi import Depends, Request, Response

from core.errors import Forbidden, Unauthorized
from core.signing import GALLERY_PURPOSE, expires_at, sign, verify
from web.app import get_ctx
from web.context import WebContext

COOKIE = "atelier_session"
LINK_PURPOSE = GALLERY_PURPOSE  # what a gallery link is signed for (core.signing.gallery_url)
SESSION_PURPOSE = "gallery-session"  # a link token is not a cookie, and the reverse
# A session lasts at most this long, and never beyond the link it came from.
SESSION_TTL = timedelta(hours=12)
HOME = "/gallery"


class NotSignedIn(Unauthorized):
    """No valid session cookie: the page says to open the bot's link again."""


def open_link(ctx: WebContext, token: str, response: Response) -> int:
    """Check a signed gallery link; on success set the session cookie and return the account."""
    subject = verify(ctx.signing_key, token, purpose=LINK_PURPOSE, now=ctx.now())
    account_id = _account_id(subject)
    start_session(ctx, account_id, token, response)
    return account_id


def start_session(ctx: WebContext, account_id: int, token: str, response: Response) -> None:
    """Set the session cookie of ``account_id``, opened by ``token`` (already verified): for
    at most SESSION_TTL and never past the token's expiry."""
    now = ctx.now()
    ttl = min(SESSION_TTL, expires_at(token) - now)
    value = sign(ctx.signing_key, subject=str(account_id), purpose=SESSION_PURPOSE, now=now,
                 ttl=ttl)
    response.set_cookie(
        COOKIE,
        value,
        max_age=max(1, int(ttl.total_seconds())),
        path="/",
        httponly=True,
        samesite="lax",
        secure=ctx.settings.public_base_url.startswith("https://"),
    )


def session_account(ctx: WebContext, request: Request) -> int:
    """The signed-in account, or NotSignedIn."""
    value = request.cookies.get(COOKIE)
    if not value:
        raise NotSignedIn(
            "open the gallery link the bot sent you (/gallery) to sign in; no chat bot? "
            "see / for how to get one"
        )
    try:
        subject = verify(ctx.signing_key, value, purpose=SESSION_PURPOSE, now=ctx.now())
    except Forbidden:
        raise NotSignedIn("your gallery session has ended; ask the bot for a new link") from None
    return _account_id(subject)


def current_account(request: Request, ctx: WebContext = Depends(get_ctx)) -> int:
    """FastAPI dependency: the signed-in account id."""
    return session_account(ctx, request)


def csrf_token(ctx: WebContext, request: Request) -> str:
    """The token forms of this session carry: bound to the session cookie, so a page of
    another site cannot know it."""
    value = request.cookies.get(COOKIE, "")
    return hmac.new(ctx.signing_key, f"csrf|{value}".encode(), hashlib.sha256).hexdigest()[:40]


def check_csrf(ctx: WebContext, request: Request, token: str) -> None:
    """Refuse a state-changing request without this session's token or from another origin."""
    origin = request.headers.get("origin")
    if origin is not None:
        own = f"{request.url.scheme}://{request.url.netloc}"
        public = ctx.settings.public_base_url.rstrip("/")
        if origin not in (own, public):
            raise Forbidden(f"a request from {origin[:80]!r} may not change this gallery")
    if not token or not hmac.compare_digest(token, csrf_token(ctx, request)):
        raise Forbidden("this form has expired; reload the page and try again")


def _account_id(subject: str) -> int:
    if not subject.isdigit():
        raise Forbidden("this link is not valid; ask the bot for a new one")
    return int(subject)
