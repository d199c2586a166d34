"""``/server-settings``: a server's admins (Manage Server) set its defaults: the model, a cap
on steps, whether anyone may press result buttons, NSFW outside age-restricted channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bots.discord import guilds
from bots.discord.autocomplete import model_choices
from core.errors import InvalidRequest

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

ADMINS_ONLY = "Only this server's admins (Manage Server) can change its settings."
SERVERS_ONLY = "Server settings only exist in a server; in a DM, use /settings."


def describe(prefs: guilds.GuildPrefs) -> str:
    def on(flag: bool) -> str:
        return "yes" if flag else "no"

    return (
        "This server's settings:\n"
        f"model: {prefs.model or 'the default'}\n"
        f"steps cap: {prefs.steps_cap or 'none'}\n"
        f"anyone may press result buttons: {on(prefs.anyone_can_press)}\n"
        f"NSFW outside age-restricted channels: {on(prefs.nsfw)}"
    )


class ServerSettings(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="server-settings", description="Server defaults (admins only)")
    @app_commands.describe(
        model="Default model for this server ('default': the deployment's)",
        steps_cap="Most steps a request here may use (0: no cap)",
        anyone_can_press="Let everyone use the buttons under results, not only the asker",
        nsfw="Allow NSFW prompts outside age-restricted channels",
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def server_settings(
        self,
        interaction: discord.Interaction[Any],
        model: str | None = None,
        steps_cap: app_commands.Range[int, 0, 500] | None = None,
        anyone_can_press: bool | None = None,
        nsfw: bool | None = None,
    ) -> None:
        """Show the server's settings, changing those given (admins only)."""
        if interaction.guild_id is None:
            await interaction.response.send_message(SERVERS_ONLY, ephemeral=True)
            return
        # default_permissions only hides the command; the server can override that.
        if not interaction.permissions.manage_guild:
            await interaction.response.send_message(ADMINS_ONLY, ephemeral=True)
            return
        state = self.bot.state
        prefs = await guilds.load(state, interaction.guild_id)
        update: dict[str, Any] = {}
        if model is not None:
            if model.lower() in ("default", "none", ""):
                update["model"] = None
            elif model not in self.bot.client.models:
                names = ", ".join(self.bot.client.models.names())
                raise_text = f"unknown model {model!r}; choose one of: {names}"
                await interaction.response.send_message(
                    str(InvalidRequest(raise_text)), ephemeral=True
                )
                return
            else:
                update["model"] = model
        if steps_cap is not None:
            update["steps_cap"] = steps_cap or None
        if anyone_can_press is not None:
            update["anyone_can_press"] = anyone_can_press
        if nsfw is not None:
            update["nsfw"] = nsfw
        if update:
            prefs = guilds.GuildPrefs.model_validate({**prefs.model_dump(), **update})
            await guilds.save(state, interaction.guild_id, prefs)
        await interaction.response.send_message(describe(prefs), ephemeral=True)

    @server_settings.autocomplete("model")
    async def _model(
        self, interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return model_choices(
            await self.bot.client.runnable.available(), current, with_default=True
        )
