"""What handlers share: the chat core in ``application.bot_data`` (never module globals), and
the small translations every handler uses: who is asking, and where."""

from __future__ import annotations

import logging

from telegram import Chat, Update, User
from telegram.ext import ContextTypes

from bots.common import jobs
from bots.common.core import ChatCore
from bots.common.port import Who
from bots.telegram.port import PHOTO_MAX_BYTES, PLATFORM
from core.errors import AtelierError

log = logging.getLogger(__name__)

KEY = "atelier"
Context = ContextTypes.DEFAULT_TYPE

__all__ = ["KEY", "PHOTO_MAX_BYTES", "PLATFORM", "Context", "core_of", "who_of"]


def core_of(context: Context) -> ChatCore:
    return context.bot_data[KEY]  # type: ignore[no-any-return]


def is_private(chat: Chat | None) -> bool:
    return chat is not None and chat.type == Chat.PRIVATE


def display_name(user: User) -> str:
    return user.full_name or user.username or str(user.id)


def who_of(update: Update) -> Who | None:
    """The person and chat of an update; None for updates without both."""
    user, chat = update.effective_user, update.effective_chat
    if user is None or chat is None:
        return None
    private = is_private(chat)
    message = update.effective_message if update.callback_query is None else None
    return Who(
        user_id=str(user.id),
        chat_id=str(chat.id),
        private=private,
        name=display_name(user),
        # Replies quote the person's message in groups only (as PTB's reply_text does).
        message_id=str(message.message_id) if message is not None and not private else None,
    )


async def reply_error(update: Update, context: Context, exc: AtelierError) -> None:
    """Answer the person with one line: what is wrong, what to do, credits left (where the
    chat core puts refusals: ``jobs.refuse``)."""
    who = who_of(update)
    if who is None or update.effective_message is None:
        return
    await jobs.refuse(core_of(context), who, exc)
