"""Discord v10 payloads the fake server sends: snowflakes, users, members, the guild with its
roles and channels, messages and interactions, shaped as discord.py 2.x reads them."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000
APP_ID = 700_000_000_000_000_001
BOT_ID = APP_ID  # a bot user's id is its application's
GUILD_ID = 710_000_000_000_000_001
OWNER_ID = 720_000_000_000_000_001  # the guild's owner (and the application's)
PLAIN_CHANNEL = 730_000_000_000_000_001
NSFW_CHANNEL = 730_000_000_000_000_002  # age-restricted
MUTED_CHANNEL = 730_000_000_000_000_003  # the bot may not post here
ADMIN_ROLE = 740_000_000_000_000_001  # holds Manage Server
DM = 0  # ``channel=DM``: the interaction comes from the person's DM with the bot

# Permission bits (discord.Permissions).
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_HISTORY = 1 << 16
USE_APP_COMMANDS = 1 << 31
MEMBER_PERMS = VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_HISTORY
MEMBER_PERMS |= USE_APP_COMMANDS
BOT_PERMS = MEMBER_PERMS


class Clock:
    """The fake's wall clock: real time plus an offset tests move forward (``advance``), so a
    job can outlive its 15-minute interaction token without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.time(), dt.UTC)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Snowflakes:
    """Ids with the clock's time in them, as Discord's (Interaction.created_at reads it)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._seq = itertools.count(1)

    def __call__(self) -> int:
        ms = int(self.clock.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._seq) & 0x3FFFFF)


def iso(when: dt.datetime) -> str:
    return when.isoformat()


def user(user_id: int, *, bot: bool = False) -> dict[str, Any]:
    name = "atelier" if bot else f"user{user_id % 10_000}"
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name.title(),
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class Channel:
    """A guild text channel; ``deny_bot`` takes permissions from the bot here."""

    id: int
    name: str
    nsfw: bool = False
    deny_bot: int = 0

    def payload(self) -> dict[str, Any]:
        overwrites = []
        if self.deny_bot:
            overwrites.append(
                {"id": str(BOT_ID), "type": 1, "allow": "0", "deny": str(self.deny_bot)}
            )
        return {
            "id": str(self.id),
            "type": 0,
            "guild_id": str(GUILD_ID),
            "name": self.name,
            "position": self.id % 10,
            "nsfw": self.nsfw,
            "topic": None,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": overwrites,
        }


@dataclass
class Guild:
    """The one guild the fake serves: @everyone, an admin role, three channels."""

    id: int = GUILD_ID
    name: str = "Atelier test server"
    owner_id: int = OWNER_ID
    premium_tier: int = 0
    channels: dict[int, Channel] = field(
        default_factory=lambda: {
            c.id: c
            for c in (
                Channel(PLAIN_CHANNEL, "general"),
                Channel(NSFW_CHANNEL, "after-dark", nsfw=True),
                Channel(MUTED_CHANNEL, "announcements", deny_bot=SEND_MESSAGES | ATTACH_FILES),
            )
        }
    )
    admins: set[int] = field(default_factory=set)  # members holding the admin role

    def roles(self) -> list[dict[str, Any]]:
        def role(role_id: int, name: str, perms: int, position: int) -> dict[str, Any]:
            return {
                "id": str(role_id),
                "name": name,
                "permissions": str(perms),
                "position": position,
                "color": 0,
                "hoist": False,
                "managed": False,
                "mentionable": False,
                "flags": 0,
            }

        return [
            role(self.id, "@everyone", MEMBER_PERMS, 0),
            role(ADMIN_ROLE, "admins", MEMBER_PERMS | MANAGE_GUILD, 1),
        ]

    def member_roles(self, user_id: int) -> list[str]:
        return [str(ADMIN_ROLE)] if user_id in self.admins else []

    def permissions(self, user_id: int, channel_id: int | None = None) -> int:
        """What ``user_id`` may do in ``channel_id`` (the bot's overwrites applied)."""
        if user_id == self.owner_id:
            return (1 << 41) - 1
        perms = MEMBER_PERMS | (MANAGE_GUILD if user_id in self.admins else 0)
        channel = self.channels.get(channel_id or 0)
        if channel is not None and user_id == BOT_ID:
            perms &= ~channel.deny_bot
        return perms

    def member(self, user_id: int, clock: Clock, **extra: Any) -> dict[str, Any]:
        return {
            "user": user(user_id, bot=user_id == BOT_ID),
            "roles": self.member_roles(user_id),
            "joined_at": iso(clock.now() - dt.timedelta(days=30)),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            **extra,
        }

    def payload(self, clock: Clock) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": self.premium_tier,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "description": None,
            "banner": None,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": self.roles(),
            "channels": [c.payload() for c in self.channels.values()],
            "threads": [],
            "members": [self.member(BOT_ID, clock)],
            "member_count": 3,
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "joined_at": iso(clock.now() - dt.timedelta(days=30)),
        }


def message(
    message_id: int,
    channel_id: int,
    clock: Clock,
    *,
    content: str = "",
    author: int = BOT_ID,
    embeds: list[Any] | None = None,
    components: list[Any] | None = None,
    attachments: list[Any] | None = None,
    flags: int = 0,
    guild_id: int | None = GUILD_ID,
    webhook_id: int | None = None,
    interaction_id: int | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "type": 0 if interaction_id is None else 20,
        "content": content,
        "author": user(author, bot=author == BOT_ID),
        "timestamp": iso(clock.now()),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments or [],
        "embeds": embeds or [],
        "components": components or [],
        "pinned": False,
        "flags": flags,
    }
    if guild_id is not None:
        msg["guild_id"] = str(guild_id)
    if webhook_id is not None:
        msg["webhook_id"] = str(webhook_id)
    return msg


_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_MASS_MENTION = re.compile(r"@(?:everyone|here)\b")


def mentions(content: str, allowed: dict[str, Any] | None) -> dict[str, Any]:
    """The mentions Discord makes of ``content`` (who it pings) under a request's
    ``allowed_mentions``: without one, everything typed pings; with one, only the kinds in
    its ``parse`` and the ids in its ``users`` / ``roles``."""
    parse = {"everyone", "users", "roles"} if allowed is None else set(allowed.get("parse") or ())
    listed_users = {int(u) for u in (allowed or {}).get("users") or ()}
    listed_roles = {int(r) for r in (allowed or {}).get("roles") or ()}
    users = {int(u) for u in _USER_MENTION.findall(content)}
    roles = {int(r) for r in _ROLE_MENTION.findall(content)}
    return {
        "mention_everyone": "everyone" in parse and bool(_MASS_MENTION.search(content)),
        "mentions": [user(u) for u in sorted(users if "users" in parse else users & listed_users)],
        "mention_roles": [
            str(r) for r in sorted(roles if "roles" in parse else roles & listed_roles)
        ],
    }


def pinged(message: dict[str, Any]) -> set[str]:
    """Who a message pings, as typed: ``@everyone``, ``<@user>``, ``<@&role>``."""
    out = {"@everyone"} if message.get("mention_everyone") else set()
    out |= {f"<@{u['id']}>" for u in message.get("mentions") or ()}
    return out | {f"<@&{r}>" for r in message.get("mention_roles") or ()}


def option(name: str, value: Any, kind: int | None = None, focused: bool = False) -> dict[str, Any]:
    """A slash command option: 3 string, 4 integer, 10 number, 11 attachment, 5 boolean."""
    if kind is None:
        kind = 5 if isinstance(value, bool) else 4 if isinstance(value, int) else 10
        kind = 3 if isinstance(value, str) else kind
    opt: dict[str, Any] = {"name": name, "type": kind, "value": value}
    if focused:
        opt["focused"] = True
    return opt
