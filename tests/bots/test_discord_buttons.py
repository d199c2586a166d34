"""Every button under a Discord result, with the real discord.py against the fake: reroll,
variations, upscales, another style, gallery, cancel; another person refused (unless the
server lets anyone press); a button pressed after the bot restarted still works."""

from __future__ import annotations

import asyncio

from bots.common import texts
from bots.common.buttons import Action
from bots.discord import guilds
from core.jobs import JobStatus
from core.request import JobKind
from testing.discord import payloads as p
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import (
    ALICE,
    BOB,
    TINY,
    answer_of,
    custom_id,
    imagine,
    press,
    result_of,
)


async def test_reroll_variation_upscale_and_restyle(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    _, result = await imagine(discord_stack, n=2, seed=11)

    reroll = await press(discord_stack, ALICE, result, Action.reroll)
    assert "Rerolling" in (await answer_of(discord_stack, reroll)).json["content"]
    await result_of(discord_stack, reroll)

    variation = await press(discord_stack, ALICE, result, Action.variation, "2")
    await result_of(discord_stack, variation)

    upscale = await press(discord_stack, ALICE, result, Action.upscale, "1")
    upscaled = await result_of(discord_stack, upscale)
    assert len(upscaled.files) == 1

    picker = await press(discord_stack, ALICE, result, Action.pick_style)
    menu = await fake.wait_for(
        lambda: next(
            (c for c in fake.calls_to("POST /webhooks/") if picker.token in c.path
             and c.custom_ids()),
            None,
        ),
        30,
        "the style picker",
    )
    restyle = await press(discord_stack, ALICE, menu, Action.restyle, "watercolor")
    await result_of(discord_stack, restyle)

    jobs = await discord_stack.finished(5)
    first, rerolled, varied, upscaled_job, restyled = (discord_stack.request_of(j) for j in jobs)
    assert rerolled.prompt == first.prompt and rerolled.seed != 11
    assert varied.kind is JobKind.variation and varied.init_image is not None
    assert upscaled_job.kind is JobKind.upscale
    assert (upscaled_job.width, upscaled_job.height) == (128, 128)
    assert restyled.styles == ("watercolor",) and restyled.seed == first.seed
    # Each press made one job, with the press's interaction as its idempotency key.
    keys = [j.idempotency_key for j in jobs[1:]]
    assert keys == [f"discord:cb:{i.id}" for i in (reroll, variation, upscale, restyle)]


async def test_gallery_button_sends_the_link_privately(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    _, result = await imagine(discord_stack)
    pressed = await press(discord_stack, ALICE, result, Action.gallery)
    answer = await answer_of(discord_stack, pressed)
    assert "private" in answer.json["content"]
    dm = await fake.wait_for(
        lambda: next((c for c in fake.calls_to("POST /channels/{channel}/messages")
                      if "/g/" in (c.json or {}).get("content", "")), None),
        30,
        "the DM with the link",
    )
    assert int(dm.path.split("/")[2]) in fake.dm_channels
    assert "https://atelier.example/g/" in dm.json["content"]


async def test_cancel_button_on_a_queued_job(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    await discord_stack.stop_dispatcher()  # it stays queued
    before = await discord_stack.balance(ALICE)
    inter = await fake.slash(ALICE, "imagine", [p.option("prompt", f"a boat {TINY}")])
    status = await fake.wait_for(
        lambda: next((c for c in fake.calls_to("PATCH /webhooks/") if inter.token in c.path
                      and c.custom_ids()), None),
        30,
        "the status with its cancel button",
    )
    cancel = await fake.click(ALICE, status.result, custom_id(status, Action.cancel))
    answer = await answer_of(discord_stack, cancel)
    assert "Cancelled" in answer.json["content"]
    (job,) = discord_stack.jobs()
    assert job.status is JobStatus.cancelled
    assert await discord_stack.balance(ALICE) == before
    await discord_stack.start_dispatcher()


async def test_another_person_is_refused_unless_the_server_allows_it(
    discord_stack: DiscordStack,
) -> None:
    _, result = await imagine(discord_stack)
    refused = await press(discord_stack, BOB, result, Action.reroll)
    assert (await answer_of(discord_stack, refused)).json["content"] == texts.NOT_YOURS
    await asyncio.sleep(0.5)
    assert len(discord_stack.jobs()) == 1

    await guilds.save(discord_stack.state, p.GUILD_ID, guilds.GuildPrefs(anyone_can_press=True))
    allowed = await press(discord_stack, BOB, result, Action.reroll)
    await result_of(discord_stack, allowed)
    jobs = await discord_stack.finished(2)
    assert jobs[1].idempotency_key == f"discord:cb:{allowed.id}"


async def test_a_button_pressed_after_the_bot_restarted_still_works(
    discord_stack: DiscordStack,
) -> None:
    _, result = await imagine(discord_stack)
    await discord_stack.stop_bot()
    await discord_stack.start_bot()  # a new process would know nothing of the old message
    assert discord_stack.fake.identifies == 2
    upscale = await press(discord_stack, ALICE, result, Action.upscale, "1")
    assert "Upscaling" in (await answer_of(discord_stack, upscale)).json["content"]
    await result_of(discord_stack, upscale)
    jobs = await discord_stack.finished(2)
    assert discord_stack.request_of(jobs[1]).kind is JobKind.upscale
