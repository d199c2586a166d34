"""Contract tests run against both brokers (real Redis and the in-process twin), then Redis-only."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from atelier.app import connect_broker
from cluster import keys
from cluster.broker import (
    Broker,
    BrokerUnavailable,
    JobEntry,
)
from cluster.broker_memory import MemoryBroker
from cluster.broker_redis import RedisBroker
from core.errors import InvalidRequest
from core.redact import redact_url
from web.ratelimit import rate_counter_for, rate_window

if TYPE_CHECKING:
    from tests.conftest import RedisServer

IDLE_MS = 150
MAX_DELIVERIES = 2


@pytest.fixture(params=["redis", "memory"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        b = RedisBroker(url, claim_idle_ms=IDLE_MS, max_deliveries=MAX_DELIVERIES)
    else:
        b = MemoryBroker(claim_idle_ms=IDLE_MS, max_deliveries=MAX_DELIVERIES)
    yield b
    await b.close()


def free_port() -> int:
    """A loopback port nothing listens on, to stand for an unreachable Redis."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def idle(ms: int = IDLE_MS) -> None:
    await asyncio.sleep(ms / 1000 + 0.05)


# Keys ---------------------------------------------------------------------------------------


def test_key_names() -> None:
    assert keys.JOBS_STREAM == "atelier:jobs"
    assert keys.DEAD_LETTER_STREAM == "atelier:jobs:dead"
    assert keys.worker_models_key("w-1") == "atelier:worker-models:w-1"
    assert keys.deliveries_stream("telegram") == "atelier:deliveries:telegram"
    assert keys.delivery_group("discord") == "discord"
    assert keys.progress_channel("j-1") == "atelier:progress:j-1"
    assert keys.cancel_key("0190f2c4-aa") == "atelier:cancel:0190f2c4-aa"


BAD_FRONTENDS = ["", "Telegram", "1tg", "tg:x", "tg x", "a" * 33, "tg\n", "tg*"]


@pytest.mark.parametrize("name", BAD_FRONTENDS)
def test_key_functions_refuse_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest, match="front end name"):
        keys.deliveries_stream(name)


@pytest.mark.parametrize("job_id", ["", "a b", "a:b", "*", "-x", "x" * 129, "j\n"])
def test_key_functions_refuse_bad_job_ids(job_id: str) -> None:
    with pytest.raises(InvalidRequest, match="job id"):
        keys.cancel_key(job_id)
    with pytest.raises(InvalidRequest, match="job id"):
        keys.progress_channel(job_id)


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact_url("redis://bob:s3cret@db/1") == "redis://bob:***@db/1"
    assert redact_url("redis://db:6379") == "redis://db:6379"
    assert "s3cret" not in redact_url("unix:///run/redis.sock?password=s3cret&db=2")


# Jobs ---------------------------------------------------------------------------------------


async def test_enqueue_read_ack(broker: Broker) -> None:
    first = await broker.jobs.enqueue("job-1", {"model": "tiny-sd15"})
    await broker.jobs.enqueue("job-2")
    assert await broker.jobs.queue_depth() == 2
    got = await broker.jobs.read_jobs("d1", count=10)
    assert [(e.entry_id, e.job_id, e.fields, e.deliveries) for e in got[:1]] == [
        (first, "job-1", {"model": "tiny-sd15"}, 1)
    ]
    assert [e.job_id for e in got] == ["job-1", "job-2"]
    assert await broker.jobs.queue_depth() == 0
    assert await broker.jobs.pending_count() == 2
    assert await broker.jobs.ack_job(first) is True
    assert await broker.jobs.ack_job(first) is False
    assert await broker.jobs.pending_count() == 1
    assert await broker.jobs.read_jobs("d1", count=10) == []


async def test_enqueue_checks_its_input(broker: Broker) -> None:
    with pytest.raises(InvalidRequest):
        await broker.jobs.enqueue("bad id")
    with pytest.raises(ValueError, match="job_id"):
        await broker.jobs.enqueue("j1", {"job_id": "other"})
    with pytest.raises(TypeError):
        await broker.jobs.enqueue("j1", {"steps": 30})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequest, match="consumer"):
        await broker.jobs.read_jobs("bad consumer")


async def test_two_consumers_never_get_the_same_entry(broker: Broker) -> None:
    ids = [f"job-{i}" for i in range(30)]
    for job_id in ids:
        await broker.jobs.enqueue(job_id)

    async def drain(consumer: str) -> list[str]:
        seen: list[str] = []
        while batch := await broker.jobs.read_jobs(consumer, count=3, block_ms=50):
            seen += [e.job_id for e in batch]
            await asyncio.sleep(0)
        return seen

    a, b = await asyncio.gather(drain("d1"), drain("d2"))
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(ids)


async def test_blocking_read_wakes_on_enqueue(broker: Broker) -> None:
    start = time.monotonic()
    assert await broker.jobs.read_jobs("d1", block_ms=0) == []
    assert time.monotonic() - start < 0.5
    reader = asyncio.create_task(broker.jobs.read_jobs("d1", block_ms=3000))
    await asyncio.sleep(0.1)
    await broker.jobs.enqueue("job-1")
    got = await asyncio.wait_for(reader, 2)
    assert [e.job_id for e in got] == ["job-1"]
    assert time.monotonic() - start < 2


async def test_unacked_entry_is_reclaimed_with_count_incremented(broker: Broker) -> None:
    entry_id = await broker.jobs.enqueue("job-1", {"k": "v"})
    [first] = await broker.jobs.read_jobs("d1")
    assert await broker.jobs.claim_stale_jobs("d2") == []  # not idle long enough yet
    await idle()
    [claimed] = await broker.jobs.claim_stale_jobs("d2")
    assert claimed == JobEntry(entry_id, "job-1", {"k": "v"}, 2)
    assert first.deliveries == 1
    assert await broker.jobs.claim_stale_jobs("d3") == []  # the claim reset its idle time
    assert await broker.jobs.pending_count() == 1
    assert await broker.jobs.ack_job(entry_id) is True
    await idle()
    assert await broker.jobs.claim_stale_jobs("d3") == []


async def test_claim_respects_count_and_min_idle(broker: Broker) -> None:
    for i in range(5):
        await broker.jobs.enqueue(f"job-{i}")
    await broker.jobs.read_jobs("d1", count=5)
    await idle()
    assert len(await broker.jobs.claim_stale_jobs("d2", count=2)) == 2
    assert await broker.jobs.claim_stale_jobs("d2", min_idle_ms=60_000) == []
    await asyncio.sleep(0.01)
    assert len(await broker.jobs.claim_stale_jobs("d2", min_idle_ms=1, count=10)) == 5


async def test_touch_keeps_a_long_job_from_being_claimed(broker: Broker) -> None:
    await broker.jobs.enqueue("job-1")
    [entry] = await broker.jobs.read_jobs("d1")
    await asyncio.sleep(IDLE_MS / 1000 * 0.5)
    await broker.jobs.touch_jobs("d1", [entry.entry_id])
    await asyncio.sleep(IDLE_MS / 1000 * 0.5)
    assert await broker.jobs.claim_stale_jobs("d2") == []
    await idle()
    [claimed] = await broker.jobs.claim_stale_jobs("d2")
    assert claimed.deliveries == 2  # touching is not a delivery


async def test_dead_letter_after_max_deliveries(broker: Broker) -> None:
    await broker.jobs.enqueue("job-1")
    [entry] = await broker.jobs.read_jobs("d1")
    for _ in range(MAX_DELIVERIES):
        assert not broker.jobs.over_delivered(entry)
        await idle()
        [entry] = await broker.jobs.claim_stale_jobs("d2")
    assert entry.deliveries == MAX_DELIVERIES + 1
    assert broker.jobs.over_delivered(entry)
    await broker.jobs.dead_letter(entry, "worker crashed: CUDA out of memory")
    assert await broker.jobs.pending_count() == 0
    [dead] = await broker.jobs.dead_letters(10)
    assert dead["job_id"] == "job-1"
    assert dead["reason"] == "worker crashed: CUDA out of memory"
    assert dead["deliveries"] == str(MAX_DELIVERIES + 1)
    assert dead["entry_id"] == entry.entry_id
    await idle()
    assert await broker.jobs.claim_stale_jobs("d3") == []


async def test_dead_letters_newest_first(broker: Broker) -> None:
    for job_id in ("a1", "a2", "a3"):
        await broker.jobs.enqueue(job_id)
    for entry in await broker.jobs.read_jobs("d1", count=3):
        await broker.jobs.dead_letter(entry, "x" * 5000)
    dead = await broker.jobs.dead_letters(2)
    assert [d["job_id"] for d in dead] == ["a3", "a2"]
    assert len(dead[0]["reason"]) == 2000


# Deliveries ---------------------------------------------------------------------------------


async def test_delivery_streams_are_independent_per_frontend(broker: Broker) -> None:
    tg = await broker.deliveries.publish_delivery(
        "telegram", {"job_id": "j1", "status": "succeeded"}
    )
    dc = await broker.deliveries.publish_delivery("discord", {"job_id": "j2", "status": "failed"})
    [got_tg] = await broker.deliveries.read_deliveries("telegram", "bot-1")
    assert (got_tg.entry_id, got_tg.frontend, got_tg.event, got_tg.deliveries) == (
        tg,
        "telegram",
        {"job_id": "j1", "status": "succeeded"},
        1,
    )
    assert await broker.deliveries.read_deliveries("telegram", "bot-2") == []
    # A consumer of the same name in another front end's group still gets that one's entries.
    [got_dc] = await broker.deliveries.read_deliveries("discord", "bot-1")
    assert got_dc.entry_id == dc and got_dc.event["job_id"] == "j2"
    assert await broker.deliveries.ack_delivery("telegram", tg) is True
    assert await broker.deliveries.ack_delivery("telegram", tg) is False
    await idle()
    assert await broker.deliveries.claim_stale_deliveries("telegram", "bot-2") == []
    [again] = await broker.deliveries.claim_stale_deliveries("discord", "bot-2")
    assert (again.entry_id, again.deliveries) == (dc, 2)
    assert await broker.deliveries.ack_delivery("discord", dc) is True
    assert await broker.jobs.read_jobs("d1") == []  # nothing leaked into the jobs stream


async def test_deliveries_published_before_the_front_end_starts_are_kept(broker: Broker) -> None:
    for i in range(3):
        await broker.deliveries.publish_delivery("web", {"n": str(i)})
    got = await broker.deliveries.read_deliveries("web", "w1", count=10, block_ms=100)
    assert [d.event["n"] for d in got] == ["0", "1", "2"]


@pytest.mark.parametrize("name", BAD_FRONTENDS)
async def test_invalid_frontend_names_are_refused(broker: Broker, name: str) -> None:
    with pytest.raises(InvalidRequest, match="front end name"):
        await broker.deliveries.publish_delivery(name, {"a": "b"})
    with pytest.raises(InvalidRequest, match="front end name"):
        await broker.deliveries.read_deliveries(name, "c1")
    with pytest.raises(InvalidRequest, match="front end name"):
        await broker.deliveries.ack_delivery(name, "1-0")
    with pytest.raises(InvalidRequest, match="front end name"):
        await broker.deliveries.claim_stale_deliveries(name, "c1")


# Progress and cancellation ------------------------------------------------------------------


async def test_progress_reaches_a_subscriber(broker: Broker) -> None:
    await broker.progress.publish("job-1", {"step": 0})  # nobody listening: dropped, no error
    async with broker.progress.subscribe("job-1") as events:
        await broker.progress.publish("job-2", {"step": 99})
        for step in range(1, 4):
            await broker.progress.publish("job-1", {"step": step, "of": 3})

        async def first(n: int) -> list[dict[str, Any]]:
            got = []
            async for event in events:
                got.append(event)
                if len(got) == n:
                    break
            return got

        got = await asyncio.wait_for(first(3), 5)
    assert got == [{"step": s, "of": 3} for s in (1, 2, 3)]
    await broker.progress.publish("job-1", {"step": 4})  # after unsubscribing: still fine


async def test_cancel_flag(broker: Broker) -> None:
    assert await broker.flags.is_cancel_requested("job-1") is False
    await broker.flags.request_cancel("job-1")
    assert await broker.flags.is_cancel_requested("job-1") is True
    assert await broker.flags.is_cancel_requested("job-2") is False
    await broker.flags.request_cancel("job-3", ttl_s=0.1)
    assert await broker.flags.is_cancel_requested("job-3") is True
    await asyncio.sleep(0.2)
    assert await broker.flags.is_cancel_requested("job-3") is False


async def test_a_redelivery_claim_goes_to_one_caller_per_period(broker: Broker) -> None:
    assert await broker.flags.claim_redelivery("job-1", ttl_s=0.3) is True
    assert await broker.flags.claim_redelivery("job-1", ttl_s=0.3) is False
    assert await broker.flags.claim_redelivery("job-2", ttl_s=0.3) is True  # per job
    await asyncio.sleep(0.4)
    assert await broker.flags.claim_redelivery("job-1", ttl_s=0.3) is True  # the period is over
    with pytest.raises(InvalidRequest, match="job id must match"):
        await broker.flags.claim_redelivery("bad id", ttl_s=1)


async def test_hits_are_counted_per_bucket_and_window(broker: Broker) -> None:
    window_s = 2.0
    counter = rate_counter_for(broker)
    # Start just after a window boundary, so all hits below fall in one window.
    _, left = rate_window(window_s)
    if left < 1.2:
        await asyncio.sleep(left + 0.05)
    counts = [(await counter.count_hit("key:1", window_s))[0] for _ in range(3)]
    assert counts == [1, 2, 3]
    hits, left = await counter.count_hit("ip:127.0.0.1", window_s)
    assert hits == 1 and 0 < left <= window_s  # per bucket
    await asyncio.sleep(left + 0.05)
    assert (await counter.count_hit("key:1", window_s))[0] == 1  # a new window
    with pytest.raises(ValueError, match="invalid rate bucket"):
        await counter.count_hit("bad bucket\n", window_s)
    if isinstance(broker, RedisBroker):  # the old window's counter goes by itself
        redis = broker.connection.client
        ttls = [await redis.pttl(k) async for k in redis.scan_iter(match=keys.RATE_PREFIX + "*")]
        assert ttls and all(0 < t <= 3000 + 1000 for t in ttls)


async def test_own_pending_jobs_are_what_a_consumer_left_unacked(broker: Broker) -> None:
    assert await broker.jobs.own_pending_jobs("d1") == []  # no group yet
    for i in range(3):
        await broker.jobs.enqueue(f"job-{i}")
    mine = await broker.jobs.read_jobs("d1", count=2)
    await broker.jobs.read_jobs("d2", count=1)
    await broker.jobs.ack_job(mine[0].entry_id)
    await asyncio.sleep(0.1)
    own = await broker.jobs.own_pending_jobs("d1")
    assert [(e.job_id, e.entry_id, e.deliveries) for e in own] == [("job-1", mine[1].entry_id, 1)]
    assert [e.job_id for e in await broker.jobs.own_pending_jobs("d2")] == ["job-2"]
    assert await broker.jobs.own_pending_jobs("nobody") == []
    # Reading them neither counts a delivery nor resets their idle time: still claimable.
    assert [e.deliveries for e in await broker.jobs.own_pending_jobs("d1")] == [1]
    await idle()
    claimed = await broker.jobs.claim_stale_jobs("d3", count=10)
    assert {e.job_id for e in claimed} == {"job-1", "job-2"}
    assert await broker.jobs.own_pending_jobs("d1") == []


async def test_demand_is_published_per_dispatcher_with_a_ttl(broker: Broker) -> None:
    assert keys.demand_key("d-1") == "atelier:demand:d-1"
    assert await broker.registry.demand() == {}
    await broker.registry.publish_demand(
        "d-1", {"l4-24gb": {"queued": 3, "busy": 1, "work_s": 24}}, ttl_s=0.3)
    await broker.registry.publish_demand(
        "d-2", {"a100-80gb": {"queued": 1, "busy": 0, "work_s": 4}}, ttl_s=30)
    assert await broker.registry.demand() == {
        "d-1": {"l4-24gb": {"queued": 3.0, "busy": 1.0, "work_s": 24.0}},
        "d-2": {"a100-80gb": {"queued": 1.0, "busy": 0.0, "work_s": 4.0}},
    }
    await asyncio.sleep(0.5)  # d-1's record lapsed (a dispatcher that died)
    assert set(await broker.registry.demand()) == {"d-2"}
    await broker.registry.withdraw_demand("d-2")  # a clean stop
    assert await broker.registry.demand() == {}
    with pytest.raises(InvalidRequest):
        await broker.registry.publish_demand("bad name", {}, ttl_s=1)


async def test_worker_models_are_published_per_worker_with_a_ttl(broker: Broker) -> None:
    assert await broker.registry.worker_models() == {}
    await broker.registry.publish_worker_models("atelier-worker-cpu-0", ["tiny", "sd15"], ttl_s=0.3)
    await broker.registry.publish_worker_models("atelier-worker-cuda-0", ["sdxl"], ttl_s=30)
    assert await broker.registry.worker_models() == {
        "atelier-worker-cpu-0": frozenset({"tiny", "sd15"}),
        "atelier-worker-cuda-0": frozenset({"sdxl"}),
    }
    # A new record replaces the old one; an empty one says "nothing loadable".
    await broker.registry.publish_worker_models("atelier-worker-cuda-0", [], ttl_s=30)
    assert (await broker.registry.worker_models())["atelier-worker-cuda-0"] == frozenset()
    await asyncio.sleep(0.4)  # the cpu worker's record lapsed: nobody refreshed it
    assert set(await broker.registry.worker_models()) == {"atelier-worker-cuda-0"}
    with pytest.raises(InvalidRequest, match="consumer name must match"):
        await broker.registry.publish_worker_models("bad id", ["tiny"])


# Stats and housekeeping ---------------------------------------------------------------------


async def test_queue_depth_and_pending(broker: Broker) -> None:
    assert (await broker.jobs.queue_depth(), await broker.jobs.pending_count()) == (0, 0)
    for i in range(4):
        await broker.jobs.enqueue(f"job-{i}")
    assert (await broker.jobs.queue_depth(), await broker.jobs.pending_count()) == (4, 0)
    [entry] = await broker.jobs.read_jobs("d1", count=1)
    assert (await broker.jobs.queue_depth(), await broker.jobs.pending_count()) == (3, 1)
    await broker.jobs.ack_job(entry.entry_id)
    assert (await broker.jobs.queue_depth(), await broker.jobs.pending_count()) == (3, 0)


async def test_trim_never_drops_unacked_entries(broker: Broker) -> None:
    for i in range(6):
        await broker.jobs.enqueue(f"job-{i}", {"i": str(i)})
    await broker.deliveries.publish_delivery("telegram", {"job_id": "job-0"})
    assert await broker.trim() == 0  # no group has read anything yet
    read = await broker.jobs.read_jobs("d1", count=4)
    await broker.jobs.ack_job(read[0].entry_id)
    await broker.jobs.ack_job(read[2].entry_id)
    await broker.jobs.ack_job(read[3].entry_id)
    # Only job-0 may go: job-1 is pending, job-2/3 sit behind it, job-4/5 are undelivered.
    assert await broker.trim() == 1
    assert await broker.jobs.queue_depth() == 2
    await idle()
    [stale] = await broker.jobs.claim_stale_jobs("d2", count=10)
    assert (stale.job_id, stale.fields) == ("job-1", {"i": "1"})
    assert [e.job_id for e in await broker.jobs.read_jobs("d1", count=10)] == ["job-4", "job-5"]
    # The delivery stream is trimmed by its own group's progress, independently.
    [delivery] = await broker.deliveries.read_deliveries("telegram", "bot-1")
    assert await broker.trim() == 0
    await broker.deliveries.ack_delivery("telegram", delivery.entry_id)
    assert await broker.trim() == 1
    for entry_id in [stale.entry_id] + [e.entry_id for e in read[1:]]:
        await broker.jobs.ack_job(entry_id)
    assert await broker.trim() == 3  # job-1, job-2, job-3
    assert await broker.jobs.pending_count() == 2
    assert await broker.jobs.queue_depth() == 0


async def test_epoch_ping_and_close(broker: Broker) -> None:
    epoch = await broker.server_epoch()
    assert epoch and epoch == await broker.server_epoch()
    assert await broker.ping() is True
    await broker.close()
    await broker.close()
    assert await broker.ping() is False
    with pytest.raises(BrokerUnavailable):
        await broker.jobs.enqueue("job-1")


async def test_close_wakes_a_blocked_reader_on_memory() -> None:
    broker = MemoryBroker()
    reader = asyncio.create_task(broker.jobs.read_jobs("d1", block_ms=5000))
    await asyncio.sleep(0.05)
    await broker.close()
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(reader, 1)


# connect_broker -----------------------------------------------------------------------------


async def test_connect_broker_prefers_redis(redis_url: str) -> None:
    broker = await connect_broker(redis_url)
    try:
        assert isinstance(broker, RedisBroker)
    finally:
        await broker.close()


async def test_connect_broker_falls_back_to_memory(caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(await connect_broker(None), MemoryBroker)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    broker = await connect_broker(url)
    assert isinstance(broker, MemoryBroker)
    assert time.monotonic() - start < 2
    assert "hunter2" not in caplog.text
    with pytest.raises(BrokerUnavailable) as excinfo:
        await connect_broker(url, fallback=False)
    assert "hunter2" not in str(excinfo.value)
    assert "***" in str(excinfo.value)


# Redis only ---------------------------------------------------------------------------------


async def test_unreachable_redis_raises_broker_unavailable() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    broker = RedisBroker(url)
    try:
        with pytest.raises(BrokerUnavailable) as excinfo:
            await broker.jobs.enqueue("job-1")
        message = str(excinfo.value)
        assert "127.0.0.1" in message and "hunter2" not in message
    finally:
        await broker.close()


async def test_redis_entries_deleted_while_pending_are_acked_away(redis_url: str) -> None:
    import redis.asyncio as aioredis

    broker = RedisBroker(redis_url, claim_idle_ms=IDLE_MS)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        gone = await broker.jobs.enqueue("job-1")
        kept = await broker.jobs.enqueue("job-2")
        await broker.jobs.read_jobs("d1", count=2)
        await raw.xdel(keys.JOBS_STREAM, gone)
        await idle()
        assert [e.entry_id for e in await broker.jobs.claim_stale_jobs("d2")] == [kept]
        assert await broker.jobs.pending_count() == 1
        # A foreign entry with no job_id is parked in the dead letters, not handed out.
        await raw.xadd(keys.JOBS_STREAM, {"something": "else"})
        assert await broker.jobs.read_jobs("d1") == []
        assert (await broker.jobs.dead_letters(1))[0]["reason"] == "no job_id field"
    finally:
        await raw.aclose()
        await broker.close()


# Keep last: restarts the session's shared redis-server (it comes back on the same port).
async def test_redis_restart_is_survived(redis_server: RedisServer, redis_url: str) -> None:
    broker = RedisBroker(redis_url, claim_idle_ms=IDLE_MS)
    try:
        await broker.jobs.enqueue("before")
        assert [e.job_id for e in await broker.jobs.read_jobs("d1")] == ["before"]
        epoch = await broker.server_epoch()

        redis_server.restart()  # nothing on disk: streams and groups are gone

        for _ in range(20):  # the first call may meet the restart half done
            try:
                assert await broker.server_epoch() != epoch
                break
            except BrokerUnavailable:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the broker did not reconnect after a Redis restart")
        assert await broker.jobs.pending_count() == 0
        await broker.jobs.enqueue("after")  # XADD alone recreates the stream, without the group
        # NOGROUP on read: the group is recreated from id 0, so "after" is still delivered.
        assert [e.job_id for e in await broker.jobs.read_jobs("d1", count=10)] == ["after"]
        await asyncio.sleep(0.01)
        stale = await broker.jobs.claim_stale_jobs("d2", min_idle_ms=1)
        assert [e.job_id for e in stale] == ["after"]
        assert await broker.ping()
    finally:
        await broker.close()
