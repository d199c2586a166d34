"""Flood control for every Bot API call: spread messages under Telegram's limits (30/s overall,
~1/s per private chat, 20/min per group) and honour RetryAfter by waiting, then retrying. First
replies go before results, results before progress edits (``Lane``). When the bot stops, calls
still waiting give up (``Stopping``): nothing of theirs was sent."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Coroutine
from datetime import timedelta
from enum import IntEnum
from typing import Any

from telegram.error import NetworkError, RetryAfter
from telegram.ext import BaseRateLimiter
from telegram.warnings import PTBDeprecationWarning

from core import metrics

log = logging.getLogger(__name__)

# Calls that put something in a chat; the rest (answers, lookups, chat actions) are not throttled.
_SENDING = ("send", "edit", "copy", "forward")
_NOT_MESSAGES = frozenset({"sendChatAction"})
_MAX_BUCKETS = 10_000


# ``rate_limit_args`` key: a coroutine function awaited when a call's turn has come, just
# before it is sent (``bots.telegram.port`` notes there that a photo goes out).
BEFORE_SEND = "before_send"
# ``rate_limit_args`` key: a coroutine function awaited when Telegram refused the call (429):
# it was surely not carried out.
REFUSED = "refused"


class Stopping(NetworkError):
    """The bot is stopping: a call waiting for its turn was not sent."""


def retry_seconds(exc: RetryAfter) -> float:
    """The pause Telegram asked for, in seconds (without PTB's int-vs-timedelta warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class Lane(IntEnum):
    """Who goes first when the flood budget is short: a person waiting for the first reply
    to what they just sent, then results, then progress edits (the next edit replaces a
    late one anyway)."""

    reply = 0  # sendMessage: statuses, refusals, answers to commands
    result = 1  # photos, documents, albums
    progress = 2  # edits of status messages


def lane_of(endpoint: str) -> Lane:
    if endpoint.startswith("edit"):
        return Lane.progress
    if endpoint == "sendMessage":
        return Lane.reply
    return Lane.result


class _Bucket:
    """A token bucket (``rate`` tokens a second, up to ``capacity``) that serves its waiters by
    lane: a call waits while a call of a more urgent lane waits, and lanes after the first
    leave ``reserve`` tokens untouched, so a first reply finds one at once."""

    def __init__(self, rate: float, capacity: float, *, reserve: float = 0.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self.reserve = min(reserve, capacity - 1) if capacity > 1 else 0.0
        self.tokens = capacity
        self.updated = time.monotonic()
        self.paused_until = 0.0
        self._waiting: list[tuple[int, int, float, asyncio.Future[None]]] = []  # a heap
        self._seq = itertools.count()
        self._pump: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    @property
    def full(self) -> bool:
        self._refill()
        return (
            self.tokens >= self.capacity
            and self.paused_until <= time.monotonic()
            and not self._waiting
        )

    def _needed(self, lane: int, n: float) -> float:
        return n + (self.reserve if lane > Lane.reply else 0.0)

    def _try(self, lane: int, n: float) -> bool:
        if self.paused_until > time.monotonic():
            return False
        self._refill()
        if self.tokens >= self._needed(lane, n):
            self.tokens -= n
            return True
        return False

    async def take(self, closing: asyncio.Event, n: float = 1.0, lane: int = Lane.reply) -> None:
        """Wait for ``n`` tokens in ``lane``; Stopping when ``closing`` is set meanwhile."""
        n = min(n, self.capacity - self.reserve if lane > Lane.reply else self.capacity)
        if closing.is_set():
            raise Stopping("the bot is stopping; not sent")
        ahead = bool(self._waiting) and self._waiting[0][0] <= lane
        if not ahead and self._try(lane, n):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (lane, next(self._seq), n, future))
        self._wake.set()
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._serve(closing), name="flood-bucket")
        await future

    async def _serve(self, closing: asyncio.Event) -> None:
        """Hand tokens to the waiters, the most urgent lane first, until none is left."""
        while self._waiting:
            lane, _, n, future = self._waiting[0]
            if future.done():  # its caller was cancelled
                heapq.heappop(self._waiting)
                continue
            if closing.is_set():
                for *_, waiter in self._waiting:
                    if not waiter.done():
                        waiter.set_exception(Stopping("the bot is stopping; not sent"))
                self._waiting.clear()
                return
            if self._try(lane, n):
                heapq.heappop(self._waiting)
                future.set_result(None)
                continue
            pause = self.paused_until - time.monotonic()
            wait = pause if pause > 0 else (self._needed(lane, n) - self.tokens) / self.rate
            self._wake.clear()
            # A more urgent arrival, or closing, ends the pause early.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await _first_of(self._wake, closing)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class FloodLimiter(BaseRateLimiter[dict[str, Any]]):
    """PTB rate limiter (``ApplicationBuilder().rate_limiter(FloodLimiter())``)."""

    def __init__(
        self,
        *,
        overall_per_s: float = 30.0,
        private_per_s: float = 1.0,
        private_burst: float = 3.0,
        group_per_min: float = 20.0,
        group_burst: float = 5.0,
        reply_reserve: float = 10.0,
        max_retries: int = 5,
    ) -> None:
        # Results and edits leave ``reply_reserve`` of the overall budget (one message of a
        # chat's) to first replies: a person's /imagine is answered at once under load.
        self.overall = _Bucket(overall_per_s, overall_per_s, reserve=reply_reserve)
        self.private = (private_per_s, private_burst)
        self.group = (group_per_min / 60.0, group_burst)
        self.max_retries = max_retries
        self._chats: dict[str, _Bucket] = {}
        self._closing = asyncio.Event()

    async def initialize(self) -> None:
        self.open()

    def open(self) -> None:
        """Take calls again after ``close``."""
        self._closing.clear()

    async def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Wake every call waiting for its turn; it raises Stopping instead of being sent."""
        self._closing.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        if self._closing.is_set():
            raise Stopping("the bot is stopping; not sent")

    def _bucket(self, chat_id: object) -> _Bucket:
        key = str(chat_id)
        bucket = self._chats.get(key)
        if bucket is None:
            if len(self._chats) >= _MAX_BUCKETS:
                self._chats = {k: b for k, b in self._chats.items() if not b.full}
            is_group = key.startswith(("-", "@"))
            rate, burst = self.group if is_group else self.private
            bucket = self._chats[key] = _Bucket(rate, burst, reserve=1.0)
        return bucket

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: dict[str, Any] | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat_id = data.get("chat_id")
        counted = (
            chat_id is not None and endpoint.startswith(_SENDING) and endpoint not in _NOT_MESSAGES
        )
        chat = self._bucket(chat_id) if counted else None
        messages = float(len(data["media"])) if isinstance(data.get("media"), list) else 1.0
        lane = lane_of(endpoint)
        attempt = 0
        while True:
            if chat is not None:
                await chat.take(self._closing, messages, lane)
                await self.overall.take(self._closing, messages, lane)
            if rate_limit_args and BEFORE_SEND in rate_limit_args:
                await rate_limit_args[BEFORE_SEND]()
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                if rate_limit_args and REFUSED in rate_limit_args:
                    await rate_limit_args[REFUSED]()
                metrics.BOT_RATE_LIMITED.labels("telegram").inc()
                attempt += 1
                wait = retry_seconds(exc)
                if attempt > self.max_retries:
                    raise
                # A 429 on a chat is about that chat; on anything else, about the whole bot.
                (chat or self.overall).pause(wait)
                log.info("%s: flood control, waiting %.1f s (try %d)", endpoint, wait, attempt)
                if chat is None:
                    await self._sleep(wait)
