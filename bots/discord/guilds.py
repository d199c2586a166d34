"""Per-server settings, set by the server's admins (Manage Server): a default model, a cap on
steps, whether anyone may press result buttons, and whether NSFW is allowed outside
age-restricted channels. Kept in the bot state beside the common group settings (same key and
document, so ``bots.common`` reads the fields it knows)."""

from __future__ import annotations

from pydantic import Field

from bots.common.prefs import GroupPrefs
from bots.common.state import GROUP, BotState

PLATFORM = "discord"


class GuildPrefs(GroupPrefs):
    """A Discord server's settings (``nsfw`` and ``anyone_can_press`` come from GroupPrefs)."""

    model: str | None = None  # None: the deployment's default model
    steps_cap: int | None = Field(default=None, ge=1)  # None: the deployment's limit


def guild_key(guild_id: int | str) -> str:
    """The settings document's key: the common group key, with the server as the group."""
    return GROUP.format(platform=PLATFORM, chat=f"guild:{guild_id}")


async def load(state: BotState, guild_id: int | str | None) -> GuildPrefs:
    """A server's settings (the defaults outside a server, or for an unreadable document)."""
    if guild_id is None:
        return GuildPrefs()
    raw = await state.get(guild_key(guild_id))
    if raw is None:
        return GuildPrefs()
    try:
        return GuildPrefs.model_validate_json(raw)
    except ValueError:
        return GuildPrefs()


async def save(state: BotState, guild_id: int | str, prefs: GuildPrefs) -> None:
    await state.set(guild_key(guild_id), prefs.model_dump_json())
