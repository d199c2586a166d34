"""Durable delivery, on a real Redis without persistence and a real store, without Ray: a finished
job's delivery lost with the broker comes back from the store until the front end marks the job
delivered (Client.mark_delivered), and never after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import Engine

from cluster import keys
from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.dispatcher import Dispatcher, Pacing
from cluster.events import EventKind, JobEvent
from cluster.placement import WorkerPool
from core.errors import Conflict
from core.jobs import JobStatus
from core.prompts import default_blocklist
from core.settings import Settings
from core.styles import default_registry
from storage.blobs import BlobStore
from storage.db import session_factory
from tests.cluster.conftest import TinyModels
from tests.cluster.helpers import Cluster, kill_redis, req, submit, who
from tests.conftest import RedisServer

FRONTEND = "telegram"


def kill_and_restart(server: RedisServer) -> None:
    """SIGKILL (no shutdown save), then a fresh, empty server on the same port."""
    kill_redis(server)
    server.start()


@pytest.fixture
async def stack(
    private_redis: RedisServer, settings: Settings, db_engine: Engine, tiny_models: TinyModels
) -> AsyncIterator[Cluster]:
    broker = RedisBroker(private_redis.url, claim_idle_ms=2000)
    sessions = session_factory(db_engine)
    blobs = BlobStore.from_settings(settings)
    # Built tiny models: submit refuses a model that no worker, or (before any worker has
    # told) this machine, can load.
    models = tiny_models.registry
    client = Client(settings=settings, session_factory=sessions, broker=broker, blobs=blobs,
                    models=models, poll_interval_s=0.1,
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    # No workers: the jobs here are cancelled while queued, so the dispatcher only settles and
    # announces them. A long grace period: only a broker restart re-announces in these tests.
    dispatcher = Dispatcher(
        dispatch=settings.dispatch.model_copy(update={"redeliver_grace_s": 3600.0}),
        sessions=sessions, broker=broker, blobs=blobs, workers=WorkerPool(), name="d1",
        models=models,
        pacing=Pacing(read_block_ms=50, epoch_check_s=0.1, reconcile_interval_s=0.2,
                      reconcile_grace_s=0.0),
    )
    c = Cluster(settings, sessions, broker, blobs, client, dispatcher)
    try:
        yield c
    finally:
        await c.close()
        await broker.close()


async def on_stream(url: str) -> list[JobEvent]:
    """The delivery stream as it stands, read without a consumer group (nothing is consumed)."""
    r = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        entries = await r.xrange(keys.deliveries_stream(FRONTEND))
    finally:
        await r.aclose()
    return [JobEvent.from_fields(fields) for _, fields in entries]


async def until_on_stream(url: str, job_ids: set[str], timeout: float = 15.0) -> list[JobEvent]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            events = await on_stream(url)
        except (aioredis.ConnectionError, OSError):
            events = []
        if job_ids <= {e.job_id for e in events}:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"no delivery of {job_ids} within {timeout} s: {events}")
        await asyncio.sleep(0.05)


async def until_epoch_seen(c: Cluster, timeout: float = 15.0) -> None:
    """Until the dispatcher has noticed the restarted broker (and run its passes)."""
    epoch = await c.broker.server_epoch()
    deadline = time.monotonic() + timeout
    while c.dispatcher._epoch != epoch:
        assert time.monotonic() < deadline, "the dispatcher did not notice the restart"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the reconcile and redeliver passes after it, and a few more


async def cancelled_jobs(c: Cluster, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = await submit(c, who("ada"), req(seed=i), frontend=FRONTEND)
        assert await c.client.cancel(job.job_id, who("ada")) is JobStatus.cancelled
        ids.append(job.job_id)
    return ids


async def test_a_delivery_lost_with_redis_comes_back_until_marked_delivered(
    stack: Cluster, private_redis: RedisServer
) -> None:
    url = private_redis.url
    kept, lost = await cancelled_jobs(stack, 2)
    stack.start()
    first = await until_on_stream(url, {kept, lost})
    assert sorted(e.job_id for e in first) == sorted([kept, lost])
    assert all(e.kind is EventKind.cancelled for e in first)
    # The front end sent ``kept``'s result and marked it; ``lost`` it never read.
    assert await stack.client.mark_delivered(kept) is True
    assert await stack.client.mark_delivered(kept) is False  # idempotent
    assert (await stack.client.job(kept)).delivered_at is not None

    kill_and_restart(private_redis)  # every stream gone, ``lost``'s delivery with them
    again = await until_on_stream(url, {lost})
    await until_epoch_seen(stack)
    again = await on_stream(url)
    assert [e.job_id for e in again] == [lost]  # once, and never ``kept``
    assert again[0].kind is EventKind.cancelled and again[0].delivery is not None

    # Marked delivered now: the next restart re-announces nothing.
    assert await stack.client.mark_delivered(lost) is True
    kill_and_restart(private_redis)
    await until_epoch_seen(stack)
    assert await on_stream(url) == []


async def test_undelivered_jobs_are_re_announced_after_the_grace_period_with_backoff(
    stack: Cluster, private_redis: RedisServer
) -> None:
    url = private_redis.url
    (job_id,) = await cancelled_jobs(stack, 1)
    d = stack.dispatcher  # not started: the test runs its passes
    # Not finished long enough ago yet (cancelled just now): nothing.
    d.reconciler.redeliver_grace_s = 3600.0
    assert await d.reconciler.redeliver(everything=False) == 0
    d.reconciler.redeliver_grace_s = 0.3
    await asyncio.sleep(0.35)
    assert await d.reconciler.redeliver(everything=False) == 1
    assert await d.reconciler.redeliver(everything=False) == 0  # backing off: 0.3 s, then 0.6 s
    await asyncio.sleep(0.35)
    assert await d.reconciler.redeliver(everything=False) == 1
    assert [e.job_id for e in await on_stream(url)] == [job_id, job_id]
    # Out of the window: left alone.
    d.reconciler.redeliver_window_s = 0.1
    await asyncio.sleep(0.7)
    assert await d.reconciler.redeliver(everything=True) == 0
    d.reconciler.redeliver_window_s = 3600.0
    assert await stack.client.mark_delivered(job_id) is True
    assert await d.reconciler.redeliver(everything=True) == 0
    assert len(await on_stream(url)) == 2


async def test_dispatchers_sharing_a_broker_re_announce_a_job_once_per_period(
    stack: Cluster, private_redis: RedisServer, settings: Settings
) -> None:
    (job_id,) = await cancelled_jobs(stack, 1)
    d1 = stack.dispatcher  # not started: the test runs the passes of both
    d2 = Dispatcher(
        dispatch=settings.dispatch.model_copy(update={"redeliver_grace_s": 1.0}),
        sessions=stack.sessions, broker=stack.broker, blobs=stack.blobs, workers=WorkerPool(),
        name="d2", models=d1.models, pacing=Pacing(reconcile_interval_s=0.2),
    )
    d1.reconciler.redeliver_grace_s = 1.0
    await asyncio.sleep(1.05)
    assert await d1.reconciler.redeliver(everything=False) == 1
    assert await d2.reconciler.redeliver(everything=False) == 0  # d1 has this period
    assert await d2.reconciler.redeliver(everything=True) == 0  # and its copy is in the stream
    await asyncio.sleep(1.05)  # d1's claim lapses; d2 looks again one step later
    assert await d2.reconciler.redeliver(everything=False) == 1
    assert await d1.reconciler.redeliver(everything=False) == 0  # d1 backs off, d2 has it now
    assert [e.job_id for e in await on_stream(private_redis.url)] == [job_id, job_id]
    # A restart loses the claims with the streams: one of them re-announces at once.
    kill_and_restart(private_redis)
    published = [await d.reconciler.redeliver(everything=True) for d in (d2, d1)]
    assert published == [1, 0]
    assert [e.job_id for e in await on_stream(private_redis.url)] == [job_id]


async def test_only_a_finished_job_can_be_marked_delivered(stack: Cluster) -> None:
    job = await submit(stack, who("ada"), req(), frontend=FRONTEND)
    with pytest.raises(Conflict, match="only a finished job can be delivered"):
        await stack.client.mark_delivered(job.job_id)


async def test_an_entry_of_a_job_marked_delivered_is_acked_not_announced(
    stack: Cluster, private_redis: RedisServer
) -> None:
    """A dispatcher reading the entry of a finished job it never announced (it restarted, or
    the entry is a duplicate) announces it only if its front end has not marked it delivered."""
    url = private_redis.url
    delivered, undelivered = await cancelled_jobs(stack, 2)  # entries still in the stream
    assert await stack.client.mark_delivered(delivered) is True
    stack.start()
    events = await until_on_stream(url, {undelivered})
    deadline = time.monotonic() + 15
    while await stack.broker.jobs.queue_depth() + await stack.broker.jobs.pending_count():
        assert time.monotonic() < deadline, "the entries were not acked"
        await asyncio.sleep(0.05)
    assert [e.job_id for e in await on_stream(url)] == [undelivered]
    assert events[0].kind is EventKind.cancelled
