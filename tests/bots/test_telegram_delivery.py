"""Delivery exactly once: flood control (429 retry_after) is waited out, a bot restarted mid-job
still posts the image once, the same update twice makes one job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bots.common.state import DELIVERED
from bots.telegram.ratelimit import FloodLimiter
from cluster.events import terminal_event
from testing.telegram import FakeTelegram
from tests.bots.conftest import TINY, Stack, settings_for
from tests.cluster.helpers import kill_redis
from tests.conftest import RedisServer


async def test_flood_control_is_waited_out_and_the_photo_sent_once(stack: Stack) -> None:
    fake, user = stack.fake, 4001
    # The limiter retries once; the delivery loop waits out the rest (without acking).
    await stack.stop_bot()
    await stack.start_bot(
        rate_limiter=FloodLimiter(private_per_s=20, private_burst=20, max_retries=1)
    )
    fake.fail(1, retry_after=1, method="sendMessage")
    fake.fail(4, retry_after=1, method="sendPhoto")
    started = time.monotonic()
    await fake.send(user, f"/imagine a storm at sea {TINY}")

    await fake.wait_call("sendPhoto", chat=user)
    assert time.monotonic() - started >= 4  # four pauses of one second, at least
    assert len(fake.calls_of("sendPhoto", chat=user, ok=False)) == 4
    assert len(fake.calls_of("sendMessage", chat=user, ok=False)) == 1
    await asyncio.sleep(1.0)
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    assert len(stack.jobs()) == 1


async def test_restart_while_delivering_posts_once(stack: Stack) -> None:
    fake, user = stack.fake, 4002
    # The first upload hits a long flood pause: the bot is stopped while it waits.
    fake.fail(1, retry_after=60, method="sendPhoto")
    await fake.send(user, f"/imagine a lantern in fog {TINY}")
    await fake.wait_for(lambda: fake.calls_of("sendPhoto", chat=user, ok=False), what="a 429")
    stopping = time.monotonic()
    await stack.stop_bot()
    assert time.monotonic() - stopping < 5  # the flood pause is abandoned, not waited out
    assert not fake.calls_of("sendPhoto", chat=user)

    await stack.start_bot()
    await fake.wait_call("sendPhoto", chat=user)
    (job,) = stack.jobs()
    marker = DELIVERED.format(platform="telegram", job=job.id)
    for _ in range(50):  # set just after the upload returns
        if await stack.state.get(marker) is not None:
            break
        await asyncio.sleep(0.1)
    assert await stack.state.get(marker) is not None

    # The dispatcher may publish a finished job again: the bot acks it without posting.
    event = terminal_event(await stack.client.job(job.id), [])
    await stack.broker.deliveries.publish_delivery("telegram", event.to_fields())
    await asyncio.sleep(1.0)
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1


async def test_stopping_during_an_upload_lets_it_finish_and_posts_once(stack: Stack) -> None:
    fake, user = stack.fake, 4006
    fake.delay("sendPhoto", 1.0)  # the upload is on the wire when the bot is told to stop
    await fake.send(user, f"/imagine a harbour crane {TINY}")
    await fake.wait_for(lambda: fake.calls_of("sendPhoto", chat=user), what="the upload")
    await stack.stop_bot()
    (job,) = stack.jobs()
    assert await stack.state.get(DELIVERED.format(platform="telegram", job=job.id))

    await stack.start_bot()  # nothing left pending: nothing posted again
    await fake.send(user, "/help")
    await fake.wait_for(
        lambda: any("How to use me" in c.params["text"] for c in fake.calls_of("sendMessage")),
        what="the restarted bot answering",
    )
    await asyncio.sleep(0.5)
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1


async def test_an_album_cut_off_by_a_restart_is_completed_not_repeated(stack: Stack) -> None:
    fake, user = stack.fake, 4007
    fake.delay("sendMediaGroup", 0.5)
    await fake.send(user, f"/imagine two lanterns {TINY} --n 2")
    await fake.wait_for(lambda: fake.calls_of("sendMediaGroup", chat=user), what="the album")
    # The message with the album's buttons meets a long flood pause; the bot stops meanwhile.
    fake.fail(1, retry_after=60, method="sendMessage")
    await fake.wait_for(
        lambda: fake.calls_of("sendMessage", chat=user, ok=False), what="the 429", timeout=10
    )
    await stack.stop_bot()

    await stack.start_bot()
    buttons = await fake.wait_call("sendMessage", chat=user, n=2)  # the status, then these
    assert {"V1", "V2"} <= {b["text"] for b in buttons.buttons()}
    await asyncio.sleep(0.5)
    assert len(fake.calls_of("sendMediaGroup", chat=user)) == 1
    assert len(fake.calls_of("sendMessage", chat=user)) == 2


async def test_restart_while_the_job_runs_posts_once(stack: Stack) -> None:
    fake, user = stack.fake, 4003
    await stack.stop_dispatcher()
    await fake.send(user, f"/imagine a paper crane {TINY}")
    await fake.wait_call("sendMessage", chat=user)
    await stack.stop_bot()  # down while the job runs and its delivery is published
    await stack.start_dispatcher()
    await stack.finished(1)
    assert not fake.calls_of("sendPhoto", chat=user)

    await stack.start_bot()
    await fake.wait_call("sendPhoto", chat=user)
    await asyncio.sleep(1.0)
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1


async def test_the_same_update_twice_makes_one_job(stack: Stack) -> None:
    fake, user = stack.fake, 4004
    update = fake.message(user, f"/imagine twin moons {TINY}")
    await fake.push(update)
    await fake.push(update)  # same message, a new update_id: a redelivery

    await fake.wait_call("sendPhoto", chat=user)
    (job,) = await stack.finished(1)
    assert job.idempotency_key == f"telegram:{user}:{update['message']['message_id']}"
    await asyncio.sleep(0.5)
    # Issue 10: a repeat found by the price check posts nothing; one that raced the first
    # past it has its status message deleted. Either way one status stays.
    statuses = [
        c for c in fake.calls_of("sendMessage", chat=user) if c.params["text"].startswith("⏳")
    ]
    assert len(statuses) - len(fake.calls_of("deleteMessage", chat=user)) == 1
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    assert len(stack.jobs()) == 1


async def test_a_photo_out_when_redis_restarts_empty_is_not_posted_again(
    private_redis: RedisServer, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path,
    tmp_path: Path,
) -> None:
    """Found by the chaos campaign (bench/chaos.py, seed 11): the photo went out, Redis died
    before the bot recorded it and came back empty (no persistence), and the delivery's retry
    posted the photo a second time."""
    s = Stack(settings_for(tmp_path, private_redis.url, fake), fake, ray_worker, tiny_dir)
    await s.start()
    try:
        user = 4010
        fake.delay("sendPhoto", 1.0)  # the upload is answered a second after it arrives
        await fake.send(user, f"/imagine a lighthouse in rain {TINY}")
        await fake.wait_for(lambda: fake.calls_of("sendPhoto", chat=user), what="the upload")
        kill_redis(private_redis)
        await asyncio.sleep(1.5)  # answered meanwhile: recording the posted photo fails
        private_redis.start()  # back, empty, before the delivery's retry

        def delivered() -> bool:
            jobs = s.jobs()
            return bool(jobs) and all(j.delivered_at is not None for j in jobs)

        await fake.wait_for(delivered, timeout=60, what="the job marked delivered")
        await asyncio.sleep(2.0)  # a repeat would come within the retry's back-off
        assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    finally:
        await s.close()


async def test_a_photo_out_when_redis_and_the_bot_both_fail_is_not_posted_again(
    private_redis: RedisServer, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path,
    tmp_path: Path,
) -> None:
    """Found by the 30-minute chaos campaign: the photo went out while Redis was down, so the
    mark that it was posted reached only the bot's memory; then the bot process went too. Its
    next run got the job again (re-announced, Redis having come back empty) and posted it a
    second time. The bot's journal on its disk (``bots.common.journal``) keeps the mark."""
    s = Stack(settings_for(tmp_path, private_redis.url, fake), fake, ray_worker, tiny_dir)
    await s.start()
    try:
        user = 4011
        fake.delay("sendPhoto", 1.0)
        await fake.send(user, f"/imagine a windmill at dusk {TINY}")
        await fake.wait_for(lambda: fake.calls_of("sendPhoto", chat=user), what="the upload")
        kill_redis(private_redis)
        await asyncio.sleep(1.5)  # answered meanwhile: recording the posted photo fails
        await s.stop_bot()  # this process, and its memory, are gone
        private_redis.start()  # back, empty
        await s.start_bot()  # a new process on the same box

        def delivered() -> bool:
            jobs = s.jobs()
            return bool(jobs) and all(j.delivered_at is not None for j in jobs)

        await fake.wait_for(delivered, timeout=90, what="the job marked delivered")
        await asyncio.sleep(2.0)
        assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    finally:
        await s.close()
