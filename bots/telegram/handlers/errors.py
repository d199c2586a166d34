"""The one error handler: the operator gets the traceback in the log, the person one useful line
(never a stack trace, never the token)."""

from __future__ import annotations

import logging

from telegram import Update
from telegram.error import Forbidden, NetworkError, RetryAfter, TelegramError

from bots.common import texts
from bots.telegram.services import Context, core_of
from core.errors import AtelierError

log = logging.getLogger("bots.telegram")


async def on_error(update: object, context: Context) -> None:
    """Log what went wrong and tell the person something useful."""
    exc = context.error
    if isinstance(exc, AtelierError):
        # Expected outcomes (credits, limits, bad input) that a handler let through.
        log.info("handler ended with %s: %s", type(exc).__name__, exc.message)
    elif isinstance(exc, Forbidden):
        log.info("the bot may not write there (%s)", exc.message)
        return
    elif isinstance(exc, RetryAfter | NetworkError):
        log.warning("Telegram unreachable or flood-limited: %s", exc)
    else:
        log.error("handler failed for update %s", _describe(update), exc_info=exc)
    if not isinstance(update, Update):
        return
    try:
        if isinstance(exc, AtelierError):
            user = update.effective_user
            text = await core_of(context).error_text(user.id, exc) if user else exc.message
        else:
            text = texts.UNEXPECTED
        if update.callback_query is not None:
            await update.callback_query.answer(text[:200], show_alert=True)
        elif update.effective_message is not None:
            await update.effective_message.reply_text(text)
    except TelegramError as reply_exc:
        log.warning("could not tell the person about the error: %s", reply_exc)


def _describe(update: object) -> str:
    """Which update failed, without its content (prompts are private)."""
    if isinstance(update, Update):
        chat = update.effective_chat.id if update.effective_chat else None
        return f"{update.update_id} (chat {chat})"
    return type(update).__name__
