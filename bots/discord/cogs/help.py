"""``/help``: what the bot does and how to ask for images, listing every command of the
command tree (so it cannot leave one out)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bots.common import texts

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

DISCORD_TIPS = (
    "The flags of /imagine are also its options (style, aspect, n, seed, steps, cfg, "
    "negative, model, image, strength).",
    "Every command answers you alone, except /imagine and /grid: their images are posted in "
    "the channel.",
)


class Help(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="help", description="How to use the bot")
    async def help(self, interaction: discord.Interaction[Any]) -> None:
        """The help text, for the asker only."""
        slash = self.bot.tree.get_commands(type=discord.AppCommandType.chat_input)
        listed = [(c.name, c.description) for c in slash]
        text = texts.help_text(listed, tips=DISCORD_TIPS)
        await interaction.response.send_message(text, ephemeral=True)
