"""Renders the chat core's keyboards (``bots.common.keyboards``) as Telegram inline keyboards."""

from __future__ import annotations

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bots.common.keyboards import Keyboard

BUTTONS_PER_ROW = 8  # Telegram shows at most 8 buttons in a row


def markup(keyboard: Keyboard | None) -> InlineKeyboardMarkup | None:
    """The inline keyboard; a row longer than Telegram shows is split."""
    if keyboard is None:
        return None
    rows: list[list[InlineKeyboardButton]] = []
    for row in keyboard:
        keys = [InlineKeyboardButton(k.label, callback_data=k.data) for k in row]
        rows += [keys[i : i + BUTTONS_PER_ROW] for i in range(0, len(keys), BUTTONS_PER_ROW)]
    return InlineKeyboardMarkup(rows)
