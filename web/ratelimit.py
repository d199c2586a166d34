"""Rate limits of the web app: per API key (in the API's ``caller`` dependency) and per client
address (``PerAddressLimit``, around the whole app). Hits are counted in fixed windows by a
``RateCounter``: on Redis (``RedisRateCounter``, keys ``cluster.keys.rate_key``), so several web
processes share one count, or in this process (``MemoryRateCounter``). Should Redis not answer,
requests pass (logged): the job queue is down then anyway, and health pages must not fail
because of it."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from cluster import keys
from cluster.broker import Broker, BrokerUnavailable
from cluster.broker_redis import RedisBroker, RedisConnection
from core import metrics
from core.errors import RateLimited
from core.settings import WebRate
from web.errors import error_response

log = logging.getLogger(__name__)

# Paths never counted per address: probes, scrapes, and the files a page is built from.
EXEMPT_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\[\]-]")


def rate_window(window_s: float) -> tuple[int, float]:
    """The fixed window now falls in (windows of ``window_s`` seconds on the wall clock, the
    same in every process) and the seconds left in it."""
    if window_s <= 0:
        raise ValueError(f"window_s must be positive, not {window_s}")
    now = time.time()
    window = int(now // window_s)
    return window, (window + 1) * window_s - now


class RateCounter(Protocol):
    """Counts hits per bucket in fixed wall-clock windows."""

    async def count_hit(self, bucket: str, window_s: float) -> tuple[int, float]:
        """Count one hit on ``bucket`` in the current fixed window of ``window_s`` seconds:
        (hits in this window so far, this one included; seconds until the window ends).
        BrokerUnavailable when the counter's store does not answer."""
        ...


class RedisRateCounter:
    """Hits counted in Redis (INCR, with a TTL of the window set by the first hit), shared by
    every process on that Redis."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def count_hit(self, bucket: str, window_s: float) -> tuple[int, float]:
        window, left = rate_window(window_s)
        key = keys.rate_key(bucket, window)
        async with self._conn.errors("counting a request"), self._conn.client.pipeline() as pipe:
            pipe.incr(key)
            pipe.pexpire(key, max(1, int(left * 1000)) + 1000, nx=True)
            hits, _ = await pipe.execute()
        return int(hits), left


class MemoryRateCounter:
    """Hits counted in this process (the single box without Redis)."""

    def __init__(self) -> None:
        self._hits: dict[str, int] = {}  # rate key -> hits
        self._until: dict[str, float] = {}  # rate key -> monotonic expiry

    async def count_hit(self, bucket: str, window_s: float) -> tuple[int, float]:
        window, left = rate_window(window_s)
        key = keys.rate_key(bucket, window)
        now = time.monotonic()
        for gone in [k for k, until in self._until.items() if until <= now]:
            del self._until[gone]
            self._hits.pop(gone, None)
        self._hits[key] = self._hits.get(key, 0) + 1
        self._until.setdefault(key, now + left)
        return self._hits[key], left


def rate_counter_for(broker: Broker) -> RateCounter:
    """The counter beside ``broker``: on its Redis connection when it is on Redis (so the web
    processes sharing that Redis share counts), else in this process."""
    if isinstance(broker, RedisBroker):
        return RedisRateCounter(broker.connection)
    return MemoryRateCounter()


class RateLimiter:
    """Fixed-window limits counted by ``counter``."""

    def __init__(self, counter: RateCounter, rate: WebRate) -> None:
        self.counter = counter
        self.rate = rate

    async def check(self, bucket: str, limit: int, what: str) -> None:
        """RateLimited (with the seconds to wait) once ``bucket`` is over ``limit`` hits in the
        current window; ``what`` names the limit in the message."""
        if limit <= 0:
            return
        try:
            hits, left = await self.counter.count_hit(bucket, self.rate.window_s)
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
