"""``/settings`` (personal defaults in a DM; the server's NSFW and button settings for its
admins in a server) and ``/styles`` (choose a default style)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bots.common import account
from bots.discord.cogs.replies import ephemeral

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot


class Settings(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="settings", description="Your defaults, or the server's (admins)")
    async def settings(self, interaction: discord.Interaction[Any]) -> None:
        """Personal defaults in a DM, the server's settings in a server (admins only)."""
        use_case = partial(account.settings, self.bot.core)
        await ephemeral(self.bot, interaction, use_case, private=None)

    @app_commands.command(name="styles", description="Pick your default style")
    async def styles(self, interaction: discord.Interaction[Any]) -> None:
        """The style picker."""
        await ephemeral(self.bot, interaction, partial(account.styles, self.bot.core))
