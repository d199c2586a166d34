"""What both APIs share: the API-key caller (Bearer or HTTP Basic) and a route class that turns
our errors into JSON naming the bad field (through the one map, ``web.errors``). Database calls
go off the event loop through ``ctx.store`` (``storage.db.Store``)."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from cluster.broker import BrokerUnavailable
from core.errors import AtelierError, Unauthorized
from core.jobs import Requester
from storage import apikeys
from storage.apikeys import ApiKeyRead
from web.app import get_ctx
from web.context import WebContext
from web.errors import error_response, validation_error
from web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

NO_KEY = (
    "no API key: send 'Authorization: Bearer atk_...' or HTTP Basic auth with the key as the "
    "password (make one with `atelier apikey create PLATFORM:USER`)"
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: their live API key and the identity it acts as."""

    key: ApiKeyRead
    requester: Requester


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
                return error_response(validation_error(exc), basic_realm=realm)
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
    found = await ctx.store(lambda s: apikeys.verify_api_key(session=s, key=key), read_only=True)
    now = ctx.now()
    if apikeys.needs_touch(found, now):
        await ctx.store(lambda s: apikeys.touch_api_key(session=s, key_id=found.id, now=now))
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
