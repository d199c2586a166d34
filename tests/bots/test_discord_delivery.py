"""Delivery on Discord: a job that outlives its 15-minute interaction token goes out with
channel.send (and by DM, or with a reason, where the bot may not post); a result too large for
the place goes smaller or as a gallery link, never as a failed upload; a bot stopped mid-job or
mid-delivery posts once; 429 retry_after is waited out; the same interaction twice makes one
job."""

from __future__ import annotations

import asyncio
import time

from bots.common.state import DELIVERED
from cluster.events import terminal_event
from core import metrics
from testing.discord import payloads as p
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, BOB, TINY, images_of, imagine, png, result_of

CHANNEL_POSTS = "POST /channels/{channel}/messages"


def posts_in(fake: object, channel: int) -> list:  # type: ignore[type-arg]
    return [c for c in fake.calls_to(CHANNEL_POSTS) if c.path == f"/channels/{channel}/messages"]


async def _expired_job(stack: DiscordStack, channel: int, prompt: str = "a comet") -> object:
    """/imagine in ``channel`` while no dispatcher runs, then 16 minutes pass."""
    fake = stack.fake
    await stack.stop_dispatcher()
    inter = await fake.slash(ALICE, "imagine", [p.option("prompt", f"{prompt} {TINY}")],
                             channel=channel)
    await fake.wait_for(lambda: fake.calls_to("PATCH /webhooks/"), 30, "the status")
    fake.clock.advance(16 * 60)
    await stack.start_dispatcher()
    return inter


async def test_a_job_outliving_its_token_is_posted_in_the_channel(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    typed = f"a comet @everyone <@{BOB}>"
    inter = await _expired_job(discord_stack, p.PLAIN_CHANNEL, typed)
    post = await fake.wait_for(lambda: posts_in(fake, p.PLAIN_CHANNEL), 90, "channel.send")
    assert post[0].files and post[0].custom_ids()
    # It pings the asker, who is no longer looking at the interaction, and nobody else.
    assert f"<@{ALICE}>" in post[0].json["content"]
    assert post[0].pings == {f"<@{ALICE}>"}
    assert not images_of(fake, inter.token)  # the stale token was not used for the result
    # The status message is finished through the channel, too.
    await fake.wait_for(
        lambda: any("✅" in (c.json or {}).get("content", "")
                    for c in fake.calls_to("PATCH /channels/{channel}/messages/{message}")),
        30,
        "the status edited through the channel",
    )
    assert not fake.calls_to("/webhooks/", ok=False)
    assert [(c.route, c.pings) for c in fake.calls if c.pings and c is not post[0]] == []


async def test_where_the_bot_may_not_post_the_results_go_by_dm_with_the_reason(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    await _expired_job(discord_stack, p.MUTED_CHANNEL)
    dm = await fake.wait_for(
        lambda: [c for c in fake.calls_to(CHANNEL_POSTS) if c.files
                 and int(c.path.split("/")[2]) in fake.dm_channels],
        90,
        "the DM with the images",
    )
    assert "Send Messages" in dm[0].json["content"] and "Attach Files" in dm[0].json["content"]
    assert not posts_in(fake, p.MUTED_CHANNEL)  # never tried where it is not allowed


async def test_with_dms_closed_too_the_status_says_why(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    fake.dm_closed.add(ALICE)
    await _expired_job(discord_stack, p.MUTED_CHANNEL)
    why = await fake.wait_for(
        lambda: [c for c in fake.calls_to("PATCH /channels/{channel}/messages/{message}")
                 if "could not post your images" in (c.json or {}).get("content", "")],
        90,
        "the status explaining",
    )
    assert "/g/" in why[0].json["content"]  # the gallery has them
    (job,) = discord_stack.jobs()
    marker = DELIVERED.format(platform="discord", job=job.id)
    for _ in range(50):
        if await discord_stack.state.get(marker):
            break
        await asyncio.sleep(0.1)
    assert await discord_stack.state.get(marker)  # given up on: not retried forever


async def test_a_result_too_large_goes_smaller_or_as_a_gallery_link(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    _, first = await imagine(discord_stack, seed=5)
    size = len(first.files[0].data)

    fake.attachment_size_limit = size - 1  # the PNG no longer fits; a WebP does
    _, smaller = await imagine(discord_stack, seed=5)
    (upload,) = smaller.files
    assert upload.filename.endswith(".webp") and len(upload.data) < size


async def test_nothing_fits_sends_the_gallery_link(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    fake.attachment_size_limit = 64
    inter = await fake.slash(ALICE, "imagine", [p.option("prompt", f"a dune {TINY}")])
    post = await fake.wait_for(
        lambda: [c for c in fake.calls_to("POST /webhooks/") if inter.token in c.path
                 and "/g/" in (c.json or {}).get("content", "")],
        90,
        "the gallery link",
    )
    assert not post[0].files and post[0].custom_ids()  # the buttons still come
    assert not [c for c in fake.calls if c.status == 413]


async def test_nsfw_refused_in_a_plain_channel_free_and_allowed_in_an_age_restricted_one(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    before = await discord_stack.balance(ALICE)
    prompt = f"a nude statue in a museum {TINY}"
    refused = await fake.slash(ALICE, "imagine", [p.option("prompt", prompt)])
    callback = await fake.wait_for(lambda: refused.callback, 30, "the refusal")
    line = callback.json["data"]  # the first answer, ephemeral
    assert line["flags"] & 64 and "not allowed here" in line["content"]
    assert not discord_stack.jobs() and await discord_stack.balance(ALICE) == before

    await imagine(discord_stack, prompt=prompt, channel=p.NSFW_CHANNEL)
    (job,) = await discord_stack.finished(1)
    assert job.status.value == "succeeded"


async def test_img2img_from_an_attachment(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    attachment = fake.add_attachment(png(96, 64))
    inter = await fake.slash(
        ALICE,
        "imagine",
        [p.option("prompt", "as a watercolor --steps 2"), p.option("image", attachment["id"], 11),
         p.option("strength", 0.5)],
        attachments=[attachment],
    )
    await result_of(discord_stack, inter)
    (job,) = await discord_stack.finished(1)
    request = discord_stack.request_of(job)
    assert request.kind.value == "img2img" and request.init_image is not None
    assert request.strength == 0.5 and request.width / request.height == 1.5


async def test_429_with_retry_after_is_waited_out_and_posted_once(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    counted = metrics.BOT_RATE_LIMITED.labels("discord")
    before = counted._value.get()
    fake.fail(2, retry_after=1.0, route="POST /webhooks/")
    started = time.monotonic()
    inter, _ = await imagine(discord_stack)
    assert time.monotonic() - started >= 2.0
    assert len([c for c in fake.calls if c.status == 429]) == 2
    assert counted._value.get() - before == 2  # atelier_bot_rate_limited_total{discord}
    await asyncio.sleep(1.0)
    assert len(images_of(fake, inter.token)) == 1


async def test_a_bot_stopped_while_the_job_runs_posts_once(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    await discord_stack.stop_dispatcher()
    inter = await fake.slash(ALICE, "imagine", [p.option("prompt", f"a paper crane {TINY}")])
    await fake.wait_for(lambda: fake.calls_to("PATCH /webhooks/"), 30, "the status")
    await discord_stack.stop_bot()  # down while the job runs and its delivery is published
    await discord_stack.start_dispatcher()
    (job,) = await discord_stack.finished(1)
    assert not images_of(fake, inter.token)

    await discord_stack.start_bot()
    await result_of(discord_stack, inter)
    marker = DELIVERED.format(platform="discord", job=job.id)
    for _ in range(50):
        if await discord_stack.state.get(marker):
            break
        await asyncio.sleep(0.1)
    assert await discord_stack.state.get(marker)
    # A re-announcement of the finished job is acked without posting again.
    event = terminal_event(await discord_stack.client.job(job.id), [])
    await discord_stack.broker.deliveries.publish_delivery("discord", event.to_fields())
    await asyncio.sleep(1.0)
    assert len(images_of(fake, inter.token)) == 1
    stored = await discord_stack.client.job(job.id)
    assert stored.delivered_at is not None  # Client.mark_delivered


async def test_a_bot_stopped_during_a_429_pause_posts_once_after_restart(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    fake.fail(1, retry_after=60, route="POST /webhooks/")
    inter = await fake.slash(ALICE, "imagine", [p.option("prompt", f"a lantern {TINY}")])
    await fake.wait_for(lambda: [c for c in fake.calls if c.status == 429], 90, "the 429")
    await discord_stack.stop_bot()
    assert not images_of(fake, inter.token)
    await discord_stack.start_bot()
    await result_of(discord_stack, inter)
    await asyncio.sleep(1.0)
    assert len(images_of(fake, inter.token)) == 1


async def test_the_same_interaction_twice_makes_one_job(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    options = [p.option("prompt", f"twin moons {TINY}")]
    first = await fake.slash(ALICE, "imagine", options)
    await fake.slash(ALICE, "imagine", options, interaction_id=first.id, token=first.token)
    await result_of(discord_stack, first)
    (job,) = await discord_stack.finished(1)
    assert job.idempotency_key == f"discord:{first.id}"
    await asyncio.sleep(1.0)
    assert len(images_of(fake, first.token)) == 1
    assert len(discord_stack.jobs()) == 1
