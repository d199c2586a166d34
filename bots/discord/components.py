"""Buttons that survive restarts: the common button data (``bots.common.buttons``, job id
inside) is the Discord ``custom_id``, and one ``DynamicItem`` routes every press by pattern, so
nothing about a message has to be remembered between runs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import discord

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

PREFIX = "at:"  # marks our custom ids (other apps' buttons never reach us, old layouts might)
MAX_PER_ROW = 5  # Discord: 5 buttons a row, 5 rows a message
MAX_ROWS = 5
_GREEN = ("rr", "rs")  # reroll / restyle: the "do it again" actions stand out


class KeyLike(Protocol):
    """One key of a platform-free keyboard: its label and its button data."""

    @property
    def label(self) -> str: ...

    @property
    def data(self) -> str: ...


class ChatButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"at:(?P<data>[^\s]{1,97})"
):
    """Any of our buttons; pressing it hands its data to the bot's button handler."""

    def __init__(self, data: str, label: str = "\u200b") -> None:
        code = data.split(":", 1)[0]
        style = discord.ButtonStyle.primary if code in _GREEN else discord.ButtonStyle.secondary
        super().__init__(discord.ui.Button(label=label[:80], style=style, custom_id=PREFIX + data))
        self.data = data

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: Any,
        /,
    ) -> ChatButton:
        label = item.label if isinstance(item, discord.ui.Button) else None
        return cls(match["data"], label or "\u200b")

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot: AtelierBot = interaction.client
        await bot.on_press(interaction, self.data)


def view_for(rows: Iterable[Sequence[KeyLike]] | None) -> discord.ui.View | None:
    """A keyboard as Discord buttons (rows longer than 5 are split; at most 25 buttons). The
    view is only a rendering: it is stopped at once so discord.py does not keep it per message
    (the ``DynamicItem`` handles the presses, today and after a restart)."""
    if not rows:
        return None
    view = discord.ui.View(timeout=None)
    row_index = 0
    for keys in rows:
        for start in range(0, len(keys), MAX_PER_ROW):
            if row_index >= MAX_ROWS:
                break
            for key in keys[start : start + MAX_PER_ROW]:
                button = ChatButton(key.data, key.label)
                button.item.row = row_index
                view.add_item(button)
            row_index += 1
    view.stop()
    return view
