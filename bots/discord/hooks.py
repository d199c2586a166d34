"""Which messages can still be reached through their interaction's webhook: an interaction
token lasts 15 minutes, after which a message is edited, and results posted, through the
channel instead. Kept in the bot state so a restarted bot still knows them."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import discord

from bots.common.state import BotState
from cluster.keys import BOT_HOOK as HOOK
from cluster.keys import BOT_HOOK_TTL_S

PLATFORM = "discord"
TOKEN_TTL = dt.timedelta(seconds=BOT_HOOK_TTL_S)  # 15 minutes
# Stop using a token this long before Discord does: a request in flight must not straddle it.
MARGIN = dt.timedelta(seconds=30)
# The key (cluster/keys.py, as HOOK) lives as long as the token.
HOOK_TTL_S = BOT_HOOK_TTL_S
DEFAULT_SIZE_LIMIT = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Hook:
    """An interaction's token, when it was made and the upload limit where it was made."""

    token: str
    created: dt.datetime
    size_limit: int = DEFAULT_SIZE_LIMIT

    def live(self, now: dt.datetime) -> bool:
        return now < self.created + TOKEN_TTL - MARGIN


def hook_of(interaction: discord.Interaction[Any]) -> Hook:
    return Hook(interaction.token, interaction.created_at, interaction.filesize_limit)


class Hooks:
    """Message id -> the hook that reaches it, while the token lives (by ``clock``)."""

    def __init__(self, state: BotState, clock: Callable[[], dt.datetime]) -> None:
        self.state = state
        self.clock = clock

    async def remember(self, message_id: int | str, hook: Hook) -> None:
        left = hook.created + TOKEN_TTL - self.clock()
        ttl = int(min(max(left.total_seconds(), 1), HOOK_TTL_S))
        doc = {"token": hook.token, "created": hook.created.timestamp(), "limit": hook.size_limit}
        await self.state.set(HOOK.format(message=message_id), json.dumps(doc), ttl)

    async def get(self, message_id: int | str | None) -> Hook | None:
        """The live hook of ``message_id``; None when there is none or its token has expired."""
        if message_id is None:
            return None
        raw = await self.state.get(HOOK.format(message=message_id))
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            hook = Hook(
                str(doc["token"]),
                dt.datetime.fromtimestamp(float(doc["created"]), dt.UTC),
                int(doc.get("limit") or DEFAULT_SIZE_LIMIT),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return hook if hook.live(self.clock()) else None
