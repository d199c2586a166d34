"""The bots' own small state: preferences, delivered-job markers, seen webhook updates. Redis
when configured (survives restarts, shared by replicas), else an in-process dict with TTLs."""

from __future__ import annotations

import heapq
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from redis import asyncio as aioredis

# Key names and their retention live in cluster/keys.py with every other Redis key; the bots
# use them under these names.
from cluster.keys import BOT_ALBUM_SEEN as ALBUM_SEEN
from cluster.keys import BOT_ALBUM_SEEN_TTL_S as ALBUM_SEEN_TTL_S
from cluster.keys import BOT_DELIVERED as DELIVERED
from cluster.keys import BOT_DELIVERED_TTL_S as DELIVERED_TTL_S
from cluster.keys import BOT_DRAFT as DRAFT
from cluster.keys import BOT_DRAFT_TTL_S as DRAFT_TTL_S
from cluster.keys import BOT_GROUP as GROUP
from cluster.keys import BOT_POSTED as POSTED
from cluster.keys import BOT_POSTED_HERE_TTL_S as POSTED_HERE_TTL_S
from cluster.keys import BOT_POSTED_TTL_S as POSTED_TTL_S
from cluster.keys import BOT_PREFIX as PREFIX
from cluster.keys import BOT_PREFS as PREFS
from cluster.keys import BOT_SEEN_UPDATE as SEEN_UPDATE
from cluster.keys import BOT_SEEN_UPDATE_TTL_S as SEEN_UPDATE_TTL_S

log = logging.getLogger(__name__)

__all__ = [
    "ALBUM_SEEN", "ALBUM_SEEN_TTL_S", "DELIVERED", "DELIVERED_TTL_S", "DRAFT", "DRAFT_TTL_S",
    "GROUP", "POSTED", "POSTED_HERE_TTL_S", "POSTED_TTL_S", "PREFIX", "PREFS", "SEEN_UPDATE",
    "SEEN_UPDATE_TTL_S", "BotState", "MemoryState", "RedisState", "make_state",
]


class BotState(ABC):
    """A tiny key-value store with TTLs."""

    @abstractmethod
    async def get(self, key: str) -> str | None: ...

    @abstractmethod
    async def set(self, key: str, value: str, ttl_s: int | None = None) -> None: ...

    @abstractmethod
    async def add(self, key: str, value: str, ttl_s: int) -> bool:
        """Set ``key`` only if absent; True if this call set it."""

    async def close(self) -> None:
        return None


class MemoryState(BotState):
    """In-process state for a single-box bot without Redis; lost on restart.

    Expired keys are swept on every write (a heap of expiry times, so each sweep costs only
    what it removes): memory holds the live keys, not every key ever set, in a bot that runs
    for months. Keys without a TTL (preferences) stay until changed.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[str, tuple[str, float | None]] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale pairs are skipped

    def __len__(self) -> int:
        """Keys held, expired ones not yet swept included."""
        return len(self._data)

    def _live(self, key: str) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            del self._data[key]
            return None
        return value

    def _sweep(self) -> None:
        now = self._clock()
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            item = self._data.get(key)
            if item is not None and item[1] == expires:  # not set again since
                del self._data[key]
        if len(heap) > 2 * len(self._data) + 64:
            # Keys set again and again leave stale pairs behind: rebuild from the live ones.
            self._expiries = [(e, k) for k, (_, e) in self._data.items() if e is not None]
            heapq.heapify(self._expiries)

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl_s: int | None = None) -> None:
        self._sweep()
        self._store(key, value, None if ttl_s is None else self._clock() + ttl_s)

    def _store(self, key: str, value: str, expires: float | None) -> None:
        """Hold ``key`` until ``expires`` (on this state's clock; None: no expiry)."""
        self._data[key] = (value, expires)
        if expires is not None:
            heapq.heappush(self._expiries, (expires, key))

    async def add(self, key: str, value: str, ttl_s: int) -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl_s)
        return True


class RedisState(BotState):
    """State in Redis (the broker's server)."""

    def __init__(self, url: str) -> None:
        self._redis: Any = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=2.0
        )

    async def get(self, key: str) -> str | None:
        value = await self._redis.get(key)
        return None if value is None else str(value)

    async def set(self, key: str, value: str, ttl_s: int | None = None) -> None:
        await self._redis.set(key, value, ex=ttl_s)

    async def add(self, key: str, value: str, ttl_s: int) -> bool:
        return bool(await self._redis.set(key, value, ex=ttl_s, nx=True))

    async def close(self) -> None:
        await self._redis.aclose()


def make_state(redis_url: str | None) -> BotState:
    """Redis-backed state when a URL is configured, else in-process."""
    if redis_url:
        return RedisState(redis_url)
    log.info("bot state: no Redis URL configured; keeping preferences in memory")
    return MemoryState()
