"""Flood control for every Bot API call: spread messages under Telegram's limits (30/s overall,
~1/s per private chat, 20/min per group) and honour RetryAfter by waiting, then retrying. When
the bot stops, calls still waiting give up (``Stopping``): nothing of theirs was sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
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


class Stopping(NetworkError):
    """The bot is stopping: a call waiting for its turn was not sent."""


def retry_seconds(exc: RetryAfter) -> float:
    """The pause Telegram asked for, in seconds (without PTB's int-vs-timedelta warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class _Bucket:
    """A token bucket: ``rate`` tokens per second, up to ``capacity`` at once."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = time.monotonic()
        self.paused_until = 0.0

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity and self.paused_until <= time.monotonic()

    async def take(self, sleep: Callable[[float], Awaitable[None]], n: float = 1.0) -> None:
        n = min(n, self.capacity)
        while True:
            pause = self.paused_until - time.monotonic()
            if pause > 0:
                await sleep(pause)
                continue
            self._refill()
            if self.tokens >= n:
                self.tokens -= n
                return
            await sleep((n - self.tokens) / self.rate)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


class FloodLimiter(BaseRateLimiter[None]):
    """PTB rate limiter (``ApplicationBuilder().rate_limiter(FloodLimiter())``)."""

    def __init__(
        self,
        *,
        overall_per_s: float = 30.0,
        private_per_s: float = 1.0,
        private_burst: float = 3.0,
        group_per_min: float = 20.0,
        group_burst: float = 5.0,
        max_retries: int = 5,
    ) -> None:
        self.overall = _Bucket(overall_per_s, overall_per_s)
        self.private = (private_per_s, private_burst)
        self.group = (group_per_min / 60.0, group_burst)
        self.max_retries = max_retries
        self._chats: dict[str, _Bucket] = {}
        self._closing = asyncio.Event()

    async def initialize(self) -> None:
        self.open()

    def open(self) -> None:
        """Take calls again after ``close``."""
        self._closing = asyncio.Event()

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
            bucket = self._chats[key] = _Bucket(rate, burst)
        return bucket

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat_id = data.get("chat_id")
        counted = (
            chat_id is not None and endpoint.startswith(_SENDING) and endpoint not in _NOT_MESSAGES
        )
        chat = self._bucket(chat_id) if counted else None
        messages = float(len(data["media"])) if isinstance(data.get("media"), list) else 1.0
        attempt = 0
        while True:
            if chat is not None:
                await chat.take(self._sleep, messages)
                await self.overall.take(self._sleep, messages)
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
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
