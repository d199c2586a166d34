"""Signed, expiring tokens for web links (gallery pages, image downloads): HMAC-SHA256."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

from core.errors import Forbidden
from core.settings import Settings

_SEP = "."
GALLERY_PURPOSE = "gallery"  # what a gallery link is signed for (web/session.py checks it)
# A chat's Vary (Region) button: signs "account:image", opens the session and the mask editor.
VARY_REGION_PURPOSE = "vary-region"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, *, subject: str, purpose: str, now: datetime, ttl: timedelta) -> str:
    """A URL-safe token binding ``subject`` (e.g. an account id) to ``purpose`` until expiry."""
    payload = {"sub": subject, "pur": purpose, "exp": int((now + ttl).timestamp())}
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = hmac.new(key, f"{purpose}{_SEP}{body}".encode(), hashlib.sha256).digest()
    return f"{body}{_SEP}{_b64(mac)}"


def verify(key: bytes, token: str, *, purpose: str, now: datetime) -> str:
    """Return the token's subject, or raise Forbidden saying why the link does not open."""
    body, sep, mac = token.partition(_SEP)
    if not sep or not body or not mac:
        raise Forbidden("this link is malformed; ask the bot for a new one")
    expected = hmac.new(key, f"{purpose}{_SEP}{body}".encode(), hashlib.sha256).digest()
    try:
        given = _unb64(mac)
        payload = json.loads(_unb64(body))
    except (ValueError, json.JSONDecodeError):
        raise Forbidden("this link is malformed; ask the bot for a new one") from None
    # Constant-time comparison: a timing side channel would let someone forge a MAC.
    if not hmac.compare_digest(given, expected) or payload.get("pur") != purpose:
        raise Forbidden("this link is not valid; ask the bot for a new one")
    if int(payload.get("exp", 0)) < int(now.timestamp()):
        raise Forbidden("this link has expired; ask the bot for a new one")
    return str(payload["sub"])


def expires_at(token: str) -> datetime:
    """When a token (already checked with ``verify``) stops opening: its ``exp`` claim."""
    body = token.partition(_SEP)[0]
    try:
        exp = int(json.loads(_unb64(body))["exp"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise Forbidden("this link is malformed; ask the bot for a new one") from None
    return datetime.fromtimestamp(exp, UTC)


def gallery_url(settings: Settings, account_id: int, *, now: datetime) -> str:
    """The signed link that opens an account's gallery, for ``settings.gallery_link_ttl_s``."""
    token = sign(
        settings.resolved_signing_key, subject=str(account_id), purpose=GALLERY_PURPOSE,
        now=now, ttl=timedelta(seconds=settings.gallery_link_ttl_s),
    )
    return f"{settings.public_base_url.rstrip('/')}/g/{token}"


def vary_region_url(settings: Settings, account_id: int, image_id: int, *, now: datetime) -> str:
    """The signed link that opens the session (as a gallery link does) on the mask editor of
    one image of the account, for ``settings.gallery_link_ttl_s``."""
    token = sign(
        settings.resolved_signing_key, subject=f"{account_id}:{image_id}",
        purpose=VARY_REGION_PURPOSE, now=now, ttl=timedelta(seconds=settings.gallery_link_ttl_s),
    )
    return f"{settings.public_base_url.rstrip('/')}/v/{token}"


def duration_text(seconds: int) -> str:
    """``7 days``, ``12 hours``, ``30 minutes``: how long a link lasts, for people."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"
