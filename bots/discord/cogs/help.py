"""``/help``: what the bot does and how to ask for images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bots.common import texts

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

DISCORD_NOTE = (
    "\n\nOn Discord, /imagine also takes its settings as options (style, aspect, n, seed, "
    "steps, cfg, negative, model, image, strength). Server admins: /server-settings."
)


class Help(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="help", description="How to use the bot")
    async def help(self, interaction: discord.Interaction[Any]) -> None:
        """The help text, for the asker only."""
        await interaction.response.send_message(texts.help_text() + DISCORD_NOTE, ephemeral=True)
