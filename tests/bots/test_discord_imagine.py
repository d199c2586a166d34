"""/imagine on Discord end to end: the real discord.py against the fake Discord, real Redis,
the store, local Ray with the tiny pipeline. Deferred within 3 s, the status edited, the images
posted as attachments with persistent buttons; refusals for the asker only and free."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from bots.common.buttons import Action, parse
from engine.demo.scenes import Scene, Shape
from engine.demo.score import score
from testing.discord import payloads as p
from testing.discord.server import Call, FakeDiscord
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, TINY, imagine, png, result_of


def actions_of(call: Call) -> list[tuple[Action, str]]:
    return [
        (b.action, b.arg) for b in (parse(cid.removeprefix("at:")) for cid in call.custom_ids())
    ]


async def test_imagine_with_options_defers_then_edits_then_posts_images_with_buttons(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    before = await discord_stack.balance(ALICE)
    inter = await fake.slash(
        ALICE,
        "imagine",
        [
            p.option("prompt", "a lighthouse at dusk --w 64 --h 64"),
            p.option("n", 2),
            p.option("seed", 7),
            p.option("steps", 2),
            p.option("cfg", 5.5),
            p.option("negative", "blurry"),
        ],
    )
    result = await result_of(discord_stack, inter)
    assert inter.callback is not None and inter.callback.json["type"] == 5  # deferred
    assert inter.callback.at - inter.sent_at < 3.0
    assert [f.filename.endswith(".png") for f in result.files] == [True, True]
    assert all(f.data.startswith(b"\x89PNG") for f in result.files)
    assert actions_of(result) == [
        (Action.reroll, ""),
        (Action.pick_style, ""),
        (Action.gallery, ""),
        (Action.variation, "1"),
        (Action.variation, "2"),
        (Action.upscale, "1"),
        (Action.upscale, "2"),
        (Action.vary_region, "1"),  # the last row: Vary (Region) per image (issue 25)
        (Action.vary_region, "2"),
    ]
    assert all(len(cid) <= 100 for cid in result.custom_ids())
    (job,) = await discord_stack.finished(1)
    request = discord_stack.request_of(job)
    assert (request.count, request.seed, request.steps, request.guidance) == (2, 7, 2, 5.5)
    assert "blurry" in request.negative
    # One status message: the deferred response, edited (queued/rendering, then done).
    edits = fake.calls_to("PATCH /webhooks/")
    assert edits and all(c.path.endswith("/messages/@original") or inter.token in c.path
                         for c in edits)
    final = await fake.wait_for(
        lambda: next((c for c in reversed(fake.calls_to("PATCH /webhooks/"))
                      if "✅" in (c.json or {}).get("content", "")), None),
        30,
        "the status saying done",
    )
    assert final.json["components"] == []  # no cancel button on a finished job
    assert await discord_stack.balance(ALICE) == before - job.cost


def shown_publicly(fake: FakeDiscord, text: str) -> list[Call]:
    """Calls that put ``text`` in a message everyone in the channel sees (not ephemeral)."""
    out = []
    for call in fake.calls:
        callback = call.route.endswith("/callback")
        body = ((call.json or {}).get("data") if callback else call.json) or {}
        if not call.ok or text not in (body.get("content") or ""):
            continue
        message = (call.result or {}).get("resource", {}).get("message") if callback else (
            call.result
        )
        if not int((message or {}).get("flags") or 0) & 64:
            out.append(call)
    return out


async def test_a_refused_prompt_is_for_the_asker_only_and_costs_nothing(
    discord_stack: DiscordStack,
) -> None:
    """A refusal known before answering (the quote) is the first answer, ephemeral: never
    a public "thinking" message first."""
    fake = discord_stack.fake
    before = await discord_stack.balance(ALICE)
    inter = await fake.slash(
        ALICE, "imagine", [p.option("prompt", f"a cat {TINY}"), p.option("style", "no-such")]
    )
    await fake.wait_for(lambda: inter.callback, 30, "the refusal")
    assert inter.callback is not None
    assert inter.callback.json["type"] == 4  # a message, not a deferral
    assert inter.callback.json["data"]["flags"] & 64  # ephemeral
    assert "no-such" in inter.callback.json["data"]["content"]
    assert inter.callback.at - inter.sent_at < 3.0
    assert not shown_publicly(fake, "no-such")
    assert not discord_stack.jobs()
    assert await discord_stack.balance(ALICE) == before


async def test_a_slow_check_defers_in_time_and_a_refusal_then_replaces_it_privately(
    discord_stack: DiscordStack,
) -> None:
    """An image slow to fetch makes the check outlast what Discord waits for: the bot defers
    publicly in time; the refusal then removes the "thinking" message (before the followup,
    which Discord would otherwise make an edit of it) and goes to the asker alone."""
    fake = discord_stack.fake
    gate = fake.hold("GET /attachments")
    attachment = fake.add_attachment(png())
    options = [p.option("prompt", f"a cat {TINY}"), p.option("style", "no-such"),
               p.option("image", attachment["id"], 11)]
    inter = await fake.slash(ALICE, "imagine", options, attachments=[attachment])
    callback = await fake.wait_for(lambda: inter.callback, 30, "the deferral")
    assert callback.json["type"] == 5 and callback.at - inter.sent_at < 3.0
    gate.set()
    answer: Call = await fake.wait_for(
        lambda: next((c for c in fake.calls_to("POST /webhooks/") if inter.token in c.path), None),
        30,
        "the refusal",
    )
    assert answer.json["flags"] & 64 and "no-such" in answer.json["content"]
    assert inter.original is not None and int(inter.original["id"]) not in fake.messages
    (deleted,) = fake.calls_to("DELETE /webhooks/")
    assert fake.calls.index(deleted) < fake.calls.index(answer)
    assert not shown_publicly(fake, "no-such")
    assert not discord_stack.jobs()


async def test_over_the_tiers_concurrency_the_reason_is_private_from_the_start(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    await discord_stack.stop_dispatcher()  # two jobs stay queued: the free tier's cap
    for n in (1, 2):
        await fake.slash(ALICE, "imagine", [p.option("prompt", f"a cat {n} {TINY}")])
        await fake.wait_for(lambda n=n: len(discord_stack.jobs()) == n, 30, f"job {n}")
    third = await fake.slash(ALICE, "imagine", [p.option("prompt", f"a dog {TINY}")])
    await fake.wait_for(lambda: third.callback, 30, "the refusal")
    assert third.callback is not None and third.callback.json["type"] == 4
    data = third.callback.json["data"]
    assert data["flags"] & 64 and "2 jobs queued or running" in data["content"]
    assert not shown_publicly(fake, "queued or running")
    assert len(discord_stack.jobs()) == 2


async def test_refused_at_submit_the_person_gets_the_real_reason_privately(
    discord_stack: DiscordStack,
) -> None:
    """Three /imagine at once on a tier allowing two: all three pass the quote, the third is
    refused at submit. Its "Queued" status goes away and it learns why, privately."""
    fake = discord_stack.fake
    await discord_stack.balance(ALICE)  # the account exists before the three race
    await discord_stack.stop_dispatcher()
    gate = fake.hold("PATCH /webhooks/")  # every status waits until all three are checked
    inters = [
        await fake.slash(ALICE, "imagine", [p.option("prompt", f"a cat {n} {TINY}")])
        for n in range(3)
    ]
    await fake.wait_for(
        lambda: len([c for c in fake.calls if c.route.startswith("PATCH /webhooks/")]) >= 3,
        30,
        "three statuses",
    )
    gate.set()
    answer: Call = await fake.wait_for(
        lambda: next(
            (
                c
                for c in fake.calls_to("POST /webhooks/")
                if "queued or running" in (c.json or {}).get("content", "")
            ),
            None,
        ),
        30,
        "the reason",
    )
    assert answer.json["flags"] & 64  # ephemeral
    assert "Queued" not in answer.json["content"]
    refused = next(i for i in inters if i.token in answer.path)
    assert refused.original is not None
    assert int(refused.original["id"]) not in fake.messages  # no stale "Queued" left
    assert not shown_publicly(fake, "queued or running")
    assert len(discord_stack.jobs()) == 2


async def test_style_and_model_autocomplete(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    inter = await fake.slash(
        ALICE,
        "imagine",
        [p.option("prompt", "a cat"), p.option("style", "water", focused=True)],
        autocomplete=True,
    )
    await fake.wait_for(lambda: inter.callback, what="the style choices")
    assert inter.callback is not None and inter.callback.json["type"] == 8
    choices: list[dict[str, Any]] = inter.callback.json["data"]["choices"]
    assert choices and choices[0]["value"] == "watercolor"

    inter = await fake.slash(
        ALICE,
        "imagine",
        [p.option("prompt", "a cat"), p.option("model", "ti", focused=True)],
        autocomplete=True,
    )
    await fake.wait_for(lambda: inter.callback, what="the model choices")
    assert "tiny" in [c["value"] for c in inter.callback.json["data"]["choices"]]  # type: ignore[union-attr]


async def test_a_demo_model_picture_shows_what_the_prompt_asked(
    discord_stack: DiscordStack,
) -> None:
    """The posted attachment itself, read back by the scorer."""
    inter, message = await imagine(discord_stack, ALICE,
                                   "a yellow star on a purple background --seed 4", model="demo")
    with Image.open(io.BytesIO(message.files[0].data)) as image:
        found = score(image, Scene("purple", (Shape("yellow", "star"),)))
    assert found["background"] and found["colour"], found
