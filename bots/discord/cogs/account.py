"""The person's account: ``/credits``, ``/gallery`` (a signed link), ``/apikey`` (shown once),
``/history`` (run a job again) and ``/link`` (join a Telegram and a Discord identity), each for
the asker only."""

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


class Account(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="credits", description="Credits left today and in packs")
    async def credits(self, interaction: discord.Interaction[Any]) -> None:
        """The balance."""
        await ephemeral(self.bot, interaction, partial(account.credits, self.bot.core))

    @app_commands.command(name="gallery", description="A private link to your images")
    async def gallery(self, interaction: discord.Interaction[Any]) -> None:
        """A signed link to the person's gallery (shared by their linked identities)."""
        await ephemeral(self.bot, interaction, partial(account.gallery, self.bot.core))

    @app_commands.command(name="apikey", description="A key for the REST and A1111 APIs")
    async def apikey(self, interaction: discord.Interaction[Any]) -> None:
        """A new API key, shown once and to the asker only."""
        await ephemeral(self.bot, interaction, partial(account.apikey, self.bot.core))

    @app_commands.command(name="history", description="Your last jobs, to run them again")
    async def history(self, interaction: discord.Interaction[Any]) -> None:
        """The last jobs with reroll buttons."""
        await ephemeral(self.bot, interaction, partial(account.history, self.bot.core))

    @app_commands.command(name="link", description="Connect your account on another platform")
    @app_commands.describe(code="A code from /link on the other platform; empty: make one")
    async def link(self, interaction: discord.Interaction[Any], code: str | None = None) -> None:
        """Make a link code, or redeem one made on Telegram."""
        use_case = partial(account.link, self.bot.core, code=(code or "").strip())
        await ephemeral(self.bot, interaction, use_case)
