"""What both APIs share: the API-key caller (Bearer or HTTP Basic), database calls off the event
loop, and a route class that turns our errors into JSON naming the bad field."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlmodel import Session

from cluster.broker import BrokerUnavailable
from core.errors import (
    AtelierError,
    Conflict,
    ContentBlocked,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
)
from core.jobs import Requester
from storage import apikeys
from storage.apikeys import ApiKeyRead
from storage.db import read_only_sessions, transaction
from web.api.sdapi_models import FieldError
from web.app import get_ctx
from web.context import WebContext
from web.ratelimit import RateLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUS: list[tuple[type[AtelierError], int]] = [
    (Unauthorized, 401),
    (InsufficientCredits, 402),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (ContentBlocked, 422),
    (InvalidRequest, 422),
    (RateLimited, 429),
]
NO_KEY = (
    "no API key: send 'Authorization: Bearer atk_...' or HTTP Basic auth with the key as the "
    "password (make one with `atelier apikey create PLATFORM:USER`)"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: their live API key and the identity it acts as."""

    key: ApiKeyRead
    requester: Requester


# For errors raised past the translation (the client's model, style and prompt checks), whose
# message names the value but not the field: the first word that names one.
_FIELD_WORDS = (
    ("steps", "steps"), ("width", "width"), ("height", "height"), ("style", "styles"),
    ("model", "model"), ("prompt", "prompt"), ("token", "prompt"), ("strength", "strength"),
    ("count", "count"),
)


def _guessed_field(message: str) -> str | None:
    words = set(message.lower().replace(",", " ").replace(";", " ").split())
    for word, field in _FIELD_WORDS:
        if word in words or word + "s" in words:
            return field
    return None


def error_body(exc: AtelierError, names: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"error", "detail", "field"}``; ``names`` maps our field names to the API's."""
    body: dict[str, Any] = {"error": exc.code, "detail": exc.message}
    field = getattr(exc, "field", None)
    if field is None and isinstance(exc, InvalidRequest):
        head = exc.message.split(": ", 1)[0] if ": " in exc.message else ""
        if head and head.replace(".", "").replace("_", "").isalnum():
            field = head
        else:
            guessed = _guessed_field(exc.message)
            field = (names or {}).get(guessed, guessed) if guessed else None
    if field is not None:
        body["field"] = field
    return body


def error_response(
    exc: AtelierError, *, basic_realm: bool = False, names: dict[str, str] | None = None
) -> JSONResponse:
    status = next((code for cls, code in STATUS if isinstance(exc, cls)), 400)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="atelier"' if basic_realm else "Bearer"
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(error_body(exc, names), status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> AtelierError:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
    return FieldError(".".join(loc) or "body", str(err.get("msg", "invalid")))


class ApiRoute(APIRoute):
    """Errors as JSON ``{"error", "detail", "field"}`` with the matching HTTP status."""

    basic_realm = False
    field_names: dict[str, str] = {}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        realm, names = self.basic_realm, self.field_names

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(_validation_error(exc), basic_realm=realm)
            except AtelierError as exc:
                return error_response(exc, basic_realm=realm, names=names)
            except BrokerUnavailable as exc:
                log.warning("%s %s: broker unavailable (%s)", request.method, request.url.path, exc)
                return JSONResponse(
                    {"error": "unavailable", "detail": "the job queue is unreachable; try again"},
                    status_code=503,
                )

        return run


class SdApiRoute(ApiRoute):
    basic_realm = True
    field_names = {
        "model": "override_settings.sd_model_checkpoint",
        "strength": "denoising_strength",
        "count": "batch_size",
    }


async def db(ctx: WebContext, fn: Callable[[Session], T], *, read_only: bool = False) -> T:
    """Run ``fn`` in one transaction on a worker thread."""
    factory = read_only_sessions(ctx.sessions) if read_only else ctx.sessions

    def work() -> T:
        with transaction(factory) as session:
            return fn(session)

    return await asyncio.to_thread(work)


def key_from_headers(request: Request) -> str:
    """The API key of a request: Bearer token, or HTTP Basic (the password; the user name when
    the password is empty, for clients that only have one field)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value.strip():
        return value.strip()
    if scheme == "basic" and value.strip():
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Unauthorized("the Basic credentials are not valid base64 user:password") from None
        return password or user
    raise Unauthorized(NO_KEY)


async def authenticate(ctx: WebContext, key: str) -> Caller:
    """The live key ``key`` is (Unauthorized otherwise), its last use recorded."""
    found = await db(ctx, lambda s: apikeys.verify_api_key(session=s, key=key), read_only=True)
    now = ctx.now()
    if apikeys.needs_touch(found, now):
        await db(ctx, lambda s: apikeys.touch_api_key(session=s, key_id=found.id, now=now))
    return Caller(
        key=found,
        requester=Requester(platform=found.platform, platform_user_id=found.platform_user_id),
    )


async def caller(request: Request, ctx: WebContext = Depends(get_ctx)) -> Caller:
    """FastAPI dependency: the authenticated caller, within its key's rate limit."""
    found = await authenticate(ctx, key_from_headers(request))
    limiter: RateLimiter = request.app.state.limiter
    await limiter.check_key(found.key.id)
    return found
