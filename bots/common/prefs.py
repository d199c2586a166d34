"""Per-person preferences (/settings, /styles) and per-group settings (set by its admins),
stored as small JSON documents in the bot state."""

from __future__ import annotations

import logging
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bots.common.state import GROUP, PREFS, BotState

log = logging.getLogger(__name__)

ASPECTS = ("1:1", "3:2", "2:3", "16:9", "9:16")
SIZES = {"s": 512, "m": 768, "l": 1024}  # the side of a square of the same pixel area
STEPS = (20, 30, 40)
Size = Literal["s", "m", "l"]
M = TypeVar("M", bound=BaseModel)


class UserPrefs(BaseModel):
    """What a person set as their defaults; flags in a prompt still win."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    aspect: str = "1:1"
    size: Size | None = None  # None: the model's default size
    steps: int | None = None  # None: the model's default
    raw: bool = False  # no prompt enhancement
    original: bool = False  # send PNG files (infotext kept) instead of compressed photos
    nsfw: bool = False  # only honoured in private chats
    style: str | None = None


class GroupPrefs(BaseModel):
    """A group's settings; only its admins change them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    nsfw: bool = False
    anyone_can_press: bool = False  # result buttons usable by everyone, not only the asker


class PrefsStore:
    """Reads and writes preferences; a broken document reads as the defaults."""

    def __init__(self, state: BotState, platform: str) -> None:
        self.state = state
        self.platform = platform

    async def user(self, user_id: str | int) -> UserPrefs:
        raw = await self.state.get(PREFS.format(platform=self.platform, user=user_id))
        return _load(UserPrefs, raw)

    async def set_user(self, user_id: str | int, prefs: UserPrefs) -> None:
        key = PREFS.format(platform=self.platform, user=user_id)
        await self.state.set(key, prefs.model_dump_json())

    async def group(self, chat_id: str | int) -> GroupPrefs:
        raw = await self.state.get(GROUP.format(platform=self.platform, chat=chat_id))
        return _load(GroupPrefs, raw)

    async def set_group(self, chat_id: str | int, prefs: GroupPrefs) -> None:
        key = GROUP.format(platform=self.platform, chat=chat_id)
        await self.state.set(key, prefs.model_dump_json())


def _load(model: type[M], raw: str | None) -> M:
    if raw is None:
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        log.warning("ignoring unreadable %s document; using the defaults", model.__name__)
        return model()
