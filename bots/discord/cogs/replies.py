"""Answering a command with a use-case's ``Say``, for the asker only (ephemeral)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import discord

from bots.common.port import Say, Who
from bots.discord.bot import acknowledge
from bots.discord.chat import who
from bots.discord.components import view_for
from core.errors import AtelierError

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

DONE = "Done."


async def ephemeral(
    bot: AtelierBot,
    interaction: discord.Interaction[Any],
    use_case: Callable[[Who], Awaitable[Say | None]],
    *,
    private: bool | None = True,
) -> None:
    """Defer (ephemeral), run ``use_case`` for the asker, show its answer to them only.
    ``private``: the answer is private (ephemeral) even in a server channel; None: private
    only in a DM (where a use-case must treat a server channel as a group)."""
    if not await acknowledge(interaction, ephemeral=True, thinking=True):
        return
    try:
        said = await use_case(who(interaction, private=private))
    except AtelierError as exc:
        said = Say(await bot.core.error_text(interaction.user.id, exc))
    text = said.text if said is not None else DONE
    keyboard = said.keyboard if said is not None else None
    await interaction.edit_original_response(content=text, view=view_for(keyboard))
