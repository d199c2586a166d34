"""RunnableModels.published against a real Redis: admissions asking at the same moment share one
read of the workers' models (a burst of 50 is one SCAN and one MGET, not 50 of each), a later
caller reads afresh, and a caller given up does not take the read from the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis

from cluster.broker_redis import RedisBroker
from cluster.registry import ModelRegistry
from cluster.runnable import RunnableModels
from core.settings import Settings


def _calls(url: str, command: str) -> int:
    """How many times Redis ran ``command`` since the last CONFIG RESETSTAT."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def _reset_stats(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.config_resetstat()
    finally:
        client.close()


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(redis_url)
    yield b
    await b.close()


async def test_callers_at_the_same_moment_share_one_read(
    broker: RedisBroker, redis_url: str, settings: Settings
) -> None:
    runnable = RunnableModels(ModelRegistry.load(settings), broker)
    await broker.registry.publish_worker_models("w1", ["tiny"])
    await broker.registry.publish_worker_models("w2", ["demo", "tiny"])
    _reset_stats(redis_url)

    answers = await asyncio.gather(*(runnable.published() for _ in range(50)))

    assert answers == [frozenset({"tiny", "demo"})] * 50
    assert _calls(redis_url, "scan") == 1
    assert _calls(redis_url, "mget") == 1

    # Once that read is over, the next caller reads again and sees what changed since.
    await broker.registry.publish_worker_models("w3", ["sdxl-turbo"])
    assert await runnable.published() == frozenset({"tiny", "demo", "sdxl-turbo"})
    assert _calls(redis_url, "scan") == 2


async def test_a_caller_given_up_leaves_the_read_to_the_others(
    broker: RedisBroker, settings: Settings
) -> None:
    runnable = RunnableModels(ModelRegistry.load(settings), broker)
    await broker.registry.publish_worker_models("w1", ["tiny"])

    first = asyncio.create_task(runnable.published())
    second = asyncio.create_task(runnable.published())
    await asyncio.sleep(0)  # both wait on the one read now
    first.cancel()

    assert await second == frozenset({"tiny"})
    assert first.cancelled()
    # And the read was not left behind as a cancelled one for the next caller.
    assert await runnable.published() == frozenset({"tiny"})
