"""Account commands: /start, /help, /credits, /gallery, /apikey, /history, /cancel, /link,
/styles and /settings (a group's settings for its admins), each a call into
``bots.common.account``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

from telegram import Update

from bots.common import account
from bots.common.core import ChatCore
from bots.common.port import Say, Who
from bots.telegram import menu
from bots.telegram.keyboards import markup
from bots.telegram.services import Context, core_of, reply_error, who_of
from core.errors import AtelierError


async def _answer(
    update: Update, context: Context, use_case: Callable[[ChatCore, Who], Awaitable[Say | None]]
) -> None:
    who, message = who_of(update), update.effective_message
    if who is None or message is None:
        return
    try:
        say = await use_case(core_of(context), who)
    except AtelierError as exc:
        await reply_error(update, context, exc)
        return
    if say is not None:
        await message.reply_text(say.text, reply_markup=markup(say.keyboard))


async def start(update: Update, context: Context) -> None:
    """Welcome the person: credits and how to start."""
    await _answer(update, context, partial(account.welcome, help_=menu.help_text()))


async def help_command(update: Update, context: Context) -> None:
    """List the commands and flags."""
    if update.effective_message is not None:
        models = await core_of(context).client.runnable.available()
        await update.effective_message.reply_text(menu.help_text(models))


async def credits(update: Update, context: Context) -> None:
    """Show daily credits left, packs with their expiry and the next reset."""
    await _answer(update, context, account.credits)


async def gallery(update: Update, context: Context) -> None:
    """Send a signed, expiring link to the person's gallery (privately)."""
    await _answer(update, context, account.gallery)


async def apikey(update: Update, context: Context) -> None:
    """Make an API key, shown once (privately; never posted in a group)."""
    await _answer(update, context, account.apikey)


async def history(update: Update, context: Context) -> None:
    """List the last 5 jobs with buttons to run them again."""
    await _answer(update, context, account.history)


async def cancel(update: Update, context: Context) -> None:
    """Cancel the person's latest queued or running job."""
    await _answer(update, context, account.cancel_latest)


async def link(update: Update, context: Context) -> None:
    """Make a link code, or redeem one: /link CODE."""
    code = "".join(context.args or ())

    async def use_case(core: ChatCore, who: Who) -> Say:
        return await account.link(core, who, code)

    await _answer(update, context, use_case)


async def styles(update: Update, context: Context) -> None:
    """Show the style picker to choose a default style."""
    await _answer(update, context, account.styles)


async def settings(update: Update, context: Context) -> None:
    """Show personal defaults (private chat) or the group's settings (admins)."""
    await _answer(update, context, account.settings)


async def unknown(update: Update, context: Context) -> None:
    """Answer a command the bot does not have."""
    if update.effective_message is not None:
        await update.effective_message.reply_text("I do not know that command; see /help.")
