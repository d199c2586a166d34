"""``/grid``: an X/Y/Z grid (``prompt`` with flags, and the ``x``, ``y``, ``z`` axes as
``cfg=3,7,11``). Like ``/imagine``: checked and priced before Discord gets an answer, so a
refusal is the asker's alone; an accepted grid runs behind a public deferred message and ends
with one labelled contact sheet."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bots.common import grid as grid_uc
from bots.common.port import Who
from bots.discord import guilds
from bots.discord.chat import who
from bots.discord.cogs.imagine import answer_checked, server_defaults
from bots.discord.port import Reply
from core.errors import InvalidRequest
from core.grid import AxisKind, ordered_axes, split_axes

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

log = logging.getLogger(__name__)


def grid_text(prompt: str, x: str, y: str | None, z: str | None) -> str:
    """The chat command's text for the slash command's options."""
    parts = [prompt.strip(), f"--x {x.strip()}"]
    if y:
        parts.append(f"--y {y.strip()}")
    if z:
        parts.append(f"--z {z.strip()}")
    return " ".join(parts)


class Grid(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="grid", description="Compare settings side by side (X/Y/Z grid)")
    @app_commands.describe(
        prompt="What to draw; flags work too, e.g. 'a fox --seed 7'",
        x="First axis, e.g. cfg=3,7,11 (seed, steps, cfg, sampler, size, style, model, "
        "lora:NAME, sr)",
        y="Second axis, e.g. steps=10,20",
        z="Third axis, e.g. style=none,watercolor",
    )
    async def grid(
        self,
        interaction: discord.Interaction[Any],
        prompt: app_commands.Range[str, 1, 1500],
        x: app_commands.Range[str, 1, 300],
        y: app_commands.Range[str, 1, 300] | None = None,
        z: app_commands.Range[str, 1, 300] | None = None,
    ) -> None:
        reply = Reply(interaction)
        asker = who(interaction, via=reply)
        checking = asyncio.create_task(
            self._check(interaction, asker, grid_text(prompt, x, y, z))
        )
        await answer_checked(
            self.bot.core, asker, reply, checking,
            lambda checked: grid_uc.start_checked(self.bot.core, asker, checked),
        )

    async def _check(
        self, interaction: discord.Interaction[Any], asker: Who, text: str
    ) -> grid_uc.CheckedGrid:
        prefs = await guilds.load(self.bot.state, interaction.guild_id)
        text = server_defaults(text, prefs)
        cap = prefs.steps_cap
        if cap is not None:  # the server's cap holds along a steps axis too
            for axis in ordered_axes(split_axes(text)[1], self.bot.styles):
                if axis.kind is AxisKind.steps and max(axis.values) > cap:
                    raise InvalidRequest(
                        f"this server allows at most {cap} steps, got {max(axis.values)}"
                    )
        return await grid_uc.check(
            self.bot.core, asker, text, idempotency_key=f"discord:{interaction.id}"
        )
