"""Helpers of the Discord suite: run /imagine and wait for its images, find and press a button
of a message the bot sent, read the answers the presser saw."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from bots.common.buttons import Action, parse
from testing.discord import payloads as p
from testing.discord.server import Call, Interaction
from tests.bots.discord_conftest import DiscordStack

ALICE = 100_000_000_000_000_001
BOB = 100_000_000_000_000_002
TINY = "--w 64 --h 64 --steps 2"


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def images_of(fake: Any, token: str) -> list[Call]:
    """Messages with images sent through ``token`` (followups)."""
    return [c for c in fake.calls_to("POST /webhooks/") if token in c.path and c.files]


async def result_of(stack: DiscordStack, inter: Interaction, n: int = 1) -> Call:
    """The ``n``-th message with images for ``inter``."""
    fake = stack.fake
    return await fake.wait_for(
        lambda: calls[n - 1] if len(calls := images_of(fake, inter.token)) >= n else None,
        90,
        "the images",
    )


async def imagine(
    stack: DiscordStack,
    user: int = ALICE,
    prompt: str = f"a lighthouse {TINY}",
    *,
    channel: int = p.PLAIN_CHANNEL,
    **options: Any,
) -> tuple[Interaction, Call]:
    """/imagine from ``user``; returns the interaction and the message with its images."""
    opts = [p.option("prompt", prompt)] + [p.option(k, v) for k, v in options.items()]
    inter = await stack.fake.slash(user, "imagine", opts, channel=channel)
    return inter, await result_of(stack, inter)


def custom_id(message: Call | dict[str, Any], action: Action, arg: str = "") -> str:
    """The custom id of the button doing ``action`` (``arg``: its number) on a message."""
    rows = message.json["components"] if isinstance(message, Call) else message["components"]
    ids = [c["custom_id"] for row in rows for c in row["components"] if "custom_id" in c]
    for cid in ids:
        button = parse(cid.removeprefix("at:"))
        if button.action is action and button.arg == arg:
            return cid
    raise AssertionError(f"no {action.name} {arg} button among {ids}")


async def press(
    stack: DiscordStack, user: int, message: Call, action: Action, arg: str = ""
) -> Interaction:
    """``user`` presses a button of the message a call made."""
    return await stack.fake.click(user, message.result, custom_id(message, action, arg))


async def answer_of(stack: DiscordStack, inter: Interaction) -> Call:
    """The ephemeral line the presser saw."""
    fake = stack.fake
    return await fake.wait_for(
        lambda: next(
            (
                c
                for c in fake.calls_to("POST /webhooks/")
                if inter.token in c.path and (c.json or {}).get("flags", 0) & 64
            ),
            None,
        ),
        60,
        "the answer to the press",
    )
