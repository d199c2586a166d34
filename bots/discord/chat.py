"""Where Discord's places differ from a chat's: a channel belongs to a server whose admins set
its settings (``GuildPrefs``, one document per server), and an age-restricted channel allows
NSFW prompts. ``DiscordCore`` is the chat core with those two rules; ``who`` builds the
person-and-place of an interaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from bots.common.core import ChatCore
from bots.common.port import Who
from bots.common.prefs import GroupPrefs, PrefsStore
from bots.common.state import BotState
from bots.discord import guilds
from bots.discord.port import PLATFORM, Reply, reply_key
from core.jobs import Requester

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot


def who(
    interaction: discord.Interaction[Any],
    *,
    private: bool | None = None,
    via: Reply | None = None,
) -> Who:
    """The person and channel of ``interaction``; a reply to it answers the interaction
    (through ``via``, a new ``Reply`` unless given). ``private``: the answer is for the person
    only (an ephemeral reply), whatever the place."""
    return Who(
        user_id=str(interaction.user.id),
        chat_id=str(interaction.channel_id),
        private=interaction.guild_id is None if private is None else private,
        name=interaction.user.display_name,
        message_id=reply_key(interaction),
        via=via if via is not None else Reply(interaction),
    )


class ServerPrefs(PrefsStore):
    """Group settings by server: a channel's "group" is the server it belongs to."""

    def __init__(self, state: BotState, bot: AtelierBot) -> None:
        super().__init__(state, PLATFORM)
        self.bot = bot

    def _guild(self, chat_id: str | int) -> int | None:
        channel = self.bot.get_channel(int(chat_id))
        guild = getattr(channel, "guild", None)
        return guild.id if isinstance(guild, discord.Guild) else None

    async def group(self, chat_id: str | int) -> GroupPrefs:
        return await guilds.load(self.state, self._guild(chat_id))

    async def set_group(self, chat_id: str | int, prefs: GroupPrefs) -> None:
        guild_id = self._guild(chat_id)
        if guild_id is None:
            return  # a DM has no server settings
        # Keep the server-only fields (model, steps cap) the common view does not show.
        current = await guilds.load(self.state, guild_id)
        update = {"nsfw": prefs.nsfw, "anyone_can_press": prefs.anyone_can_press}
        await guilds.save(self.state, guild_id, current.model_copy(update=update))


@dataclass
class DiscordCore(ChatCore):
    """The chat core, knowing that age-restricted channels allow NSFW prompts."""

    bot: AtelierBot | None = None

    async def requester(self, who: Who) -> Requester:
        requester = await super().requester(who)
        if requester.nsfw_allowed or self.bot is None or who.private:
            return requester
        channel = self.bot.get_channel(int(who.chat_id))
        if isinstance(channel, discord.TextChannel | discord.Thread) and channel.is_nsfw():
            return requester.model_copy(update={"nsfw_allowed": True})
        return requester
