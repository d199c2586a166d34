"""What handlers share, kept in ``application.bot_data`` (never module globals), plus the small
helpers every handler uses: who is asking, in what kind of chat, and how to answer an error."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from telegram import Chat, Message, Update, User
from telegram.constants import ChatMemberStatus
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from bots.common import texts
from bots.common.delivery import DeliveryLoop
from bots.common.prefs import PrefsStore
from bots.common.progress import ProgressEditor
from bots.common.state import BotState
from cluster.client import Client
from core.errors import AtelierError
from core.jobs import Requester
from core.settings import Settings
from core.styles import StyleRegistry

log = logging.getLogger(__name__)

PLATFORM = "telegram"
KEY = "atelier"
GALLERY_TTL = timedelta(days=7)
PHOTO_MAX_BYTES = 10 * 1024 * 1024  # Telegram's photo limit: larger images go as documents

Context = ContextTypes.DEFAULT_TYPE


@dataclass
class Services:
    """The bot's collaborators, passed in by ``build_application``."""

    settings: Settings
    client: Client
    state: BotState
    prefs: PrefsStore
    editor: ProgressEditor
    styles: StyleRegistry
    delivery: DeliveryLoop
    gallery_ttl: timedelta = GALLERY_TTL
    photo_max_bytes: int = PHOTO_MAX_BYTES
    # Per job: the task following its progress.
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)


def services(context: Context) -> Services:
    return context.bot_data[KEY]  # type: ignore[no-any-return]


def is_private(chat: Chat | None) -> bool:
    return chat is not None and chat.type == Chat.PRIVATE


def display_name(user: User) -> str:
    return user.full_name or user.username or str(user.id)


async def requester_for(svc: Services, user: User, chat: Chat) -> Requester:
    """The person asking, with the NSFW allowance of where they ask."""
    if is_private(chat):
        nsfw = (await svc.prefs.user(user.id)).nsfw
    else:
        nsfw = (await svc.prefs.group(chat.id)).nsfw
    return Requester(
        platform=PLATFORM,
        platform_user_id=str(user.id),
        display_name=display_name(user),
        nsfw_allowed=nsfw,
    )


def plain_requester(user_id: str | int) -> Requester:
    """A requester only to look an account up (balance, history): no channel context."""
    return Requester(platform=PLATFORM, platform_user_id=str(user_id))


async def is_admin(context: Context, chat_id: int, user_id: int) -> bool:
    member = await context.bot.get_chat_member(chat_id, user_id)
    return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)


async def credits_left(svc: Services, user_id: str | int) -> int | None:
    """The total a person can spend now, or None if it cannot be read at the moment."""
    try:
        return (await svc.client.balance(plain_requester(user_id))).total
    except Exception as exc:
        log.warning("could not read the balance of telegram:%s (%s)", user_id, exc)
        return None


async def error_text(svc: Services, user_id: str | int, exc: AtelierError) -> str:
    return texts.error_line(exc, await credits_left(svc, user_id))


async def reply_error(update: Update, context: Context, exc: AtelierError) -> None:
    """Answer the person with one line: what is wrong, what to do, credits left."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    text = await error_text(services(context), user.id, exc)
    await message.reply_text(text)


async def send_private(context: Context, user_id: int, text: str) -> Message | None:
    """Message the person privately; None if they never opened a chat with the bot."""
    try:
        return await context.bot.send_message(user_id, text)
    except TelegramError as exc:
        log.info("cannot message telegram:%s privately (%s)", user_id, exc)
        return None
