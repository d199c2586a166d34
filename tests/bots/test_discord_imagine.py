"""/imagine on Discord end to end: the real discord.py against the fake Discord, real Redis,
the store, local Ray with the tiny pipeline. Deferred within 3 s, the status edited, the images
posted as attachments with persistent buttons; refusals for the asker only and free."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from bots.common.buttons import Action, parse
from bots.discord.fake import payloads as p
from bots.discord.fake.server import Call
from cluster.demo.scenes import Scene, Shape
from cluster.demo.score import score
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, TINY, imagine, result_of


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


async def test_a_refused_prompt_is_for_the_asker_only_and_costs_nothing(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    before = await discord_stack.balance(ALICE)
    inter = await fake.slash(
        ALICE, "imagine", [p.option("prompt", f"a cat {TINY}"), p.option("style", "no-such")]
    )
    refusal: Call = await fake.wait_for(
        lambda: next(
            (c for c in fake.calls_to("POST /webhooks/") if inter.token in c.path), None
        ),
        30,
        "the refusal",
    )
    assert refusal.json["flags"] & 64  # ephemeral
    assert "no-such" in refusal.json["content"]
    assert fake.calls_to("DELETE /webhooks/")  # the public "thinking" message is gone
    assert not discord_stack.jobs()
    assert await discord_stack.balance(ALICE) == before


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
