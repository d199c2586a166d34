"""Rate limits of the web app: per API key (in the API's ``caller`` dependency) and per client
address (``PerAddressLimit``, around the whole app). Hits are counted in fixed windows in the
broker, so several web processes share one count. Should the broker not answer, requests pass
(logged): the job queue is down then anyway, and health pages must not fail because of it."""

from __future__ import annotations

import logging
import math
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster.broker import Broker, BrokerUnavailable
from core import metrics
from core.errors import RateLimited
from core.settings import WebRate
from web.errors import error_response

log = logging.getLogger(__name__)

# Paths never counted per address: probes, scrapes, and the files a page is built from.
EXEMPT_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\[\]-]")


class RateLimiter:
    """Fixed-window limits counted in ``broker``."""

    def __init__(self, broker: Broker, rate: WebRate) -> None:
        self.broker = broker
        self.rate = rate

    async def check(self, bucket: str, limit: int, what: str) -> None:
        """RateLimited (with the seconds to wait) once ``bucket`` is over ``limit`` hits in the
        current window; ``what`` names the limit in the message."""
        if limit <= 0:
            return
        try:
            hits, left = await self.broker.count_hit(bucket, self.rate.window_s)
        except BrokerUnavailable as exc:
            log.warning("rate limit %s not checked: %s", what, exc)
            return
        if hits > limit:
            metrics.WEB_RATE_LIMITED.labels(by=what.split()[-1]).inc()
            wait = max(1, math.ceil(left))
            raise RateLimited(
                f"too many requests for this {what}: {limit} per {self.rate.window_s:g} s; "
                f"try again in {wait} s", retry_after=wait,
            )

    async def check_key(self, key_id: int) -> None:
        await self.check(f"key:{key_id}", self.rate.per_key, "API key")

    async def check_address(self, address: str) -> None:
        await self.check(f"ip:{_UNSAFE.sub('_', address)[:100]}", self.rate.per_ip, "address")


class PerAddressLimit:
    """ASGI middleware: 429 with Retry-After once a client address is over its limit."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        try:
            await self.limiter.check_address(client[0] if client else "unknown")
        except RateLimited as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)
