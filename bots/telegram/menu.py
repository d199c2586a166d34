"""The Telegram bot's command menu (``setMyCommands``) and the /help text made from it, so
that /help lists every command of the menu (tests/bots/test_telegram_accounts.py checks the
menu against the registered handlers)."""

from __future__ import annotations

from collections.abc import Sequence

from telegram import BotCommand

from bots.common import texts

COMMANDS = (
    BotCommand("imagine", "Make images: /imagine a lighthouse at dusk --ar 16:9"),
    BotCommand("grid", "Compare settings: /grid a fox --x cfg=3,7,11 --y steps=10,20"),
    BotCommand("styles", "Pick your default style"),
    BotCommand("settings", "Default size, steps, raw mode, PNG files"),
    BotCommand("credits", "Credits left today and in packs"),
    BotCommand("buy", "Buy credit packs or a subscription with Stars"),
    BotCommand("gallery", "A private link to your images"),
    BotCommand("apikey", "A key for the REST and A1111 APIs"),
    BotCommand("history", "Your last jobs, to run again"),
    BotCommand("cancel", "Stop your running job"),
    BotCommand("link", "Connect your account on another platform"),
    BotCommand("help", "How to use the bot"),
)

# Handled, but kept off the menu: for the operators named in ATELIER_OPERATORS.
OPERATOR_COMMANDS = ("refund",)


def help_text(models: Sequence[str] = ()) -> str:
    """/help: the menu's commands, the photo tip, the flags and ``models``."""
    commands = [(c.command, c.description) for c in COMMANDS]
    return texts.help_text(commands, models, tips=(texts.PHOTO_TIP,))
