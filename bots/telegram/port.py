"""``TelegramPort``: the chat core's port (``bots.common.port.ChatPort``) over a PTB ``Bot``:
messages, status edits, albums of results (documents for PNG files), chat actions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from telegram import InputMediaDocument, InputMediaPhoto, ReplyParameters
from telegram.constants import ChatAction, ChatMemberStatus
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import ExtBot

from bots.common.delivery import NotSent, RetryLater, Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import Destination, Outgoing, Part
from bots.telegram.keyboards import markup
from bots.telegram.ratelimit import BEFORE_SEND, REFUSED, Stopping, retry_seconds

log = logging.getLogger(__name__)

PLATFORM = "telegram"
PHOTO_MAX_BYTES = 10 * 1024 * 1024  # Telegram's photo limit: larger images go as documents
ALBUM_MAX = 10  # items in one media group


@contextlib.contextmanager
def delivery_errors(chat_id: str) -> Iterator[None]:
    """Telegram's errors in the port's terms: flood control -> RetryLater, a chat that is gone
    or where the bot may not write -> Undeliverable, another answer refusing it -> NotSent. A
    lost connection (timed out, a network error) is none of those: the message may be out."""
    try:
        yield
    except RetryAfter as exc:
        raise RetryLater(retry_seconds(exc)) from exc
    except (Forbidden, ChatMigrated) as exc:
        raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
    except BadRequest as exc:
        if "chat not found" in exc.message.lower():
            raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
        raise NotSent(f"chat {chat_id}: {exc.message}") from exc
    except TelegramError as exc:
        if isinstance(exc, TimedOut) or type(exc) is NetworkError:
            raise
        raise NotSent(f"chat {chat_id}: {exc.message}") from exc


class TelegramPort:
    """The Telegram side of the chat core."""

    platform = PLATFORM
    album_max = ALBUM_MAX
    keyboard_on_album = False  # an album takes no keyboard: the buttons follow on their own

    def __init__(self, bot: ExtBot[Any], *, photo_max_bytes: int = PHOTO_MAX_BYTES) -> None:
        self.bot = bot
        self.photo_max_bytes = photo_max_bytes

    async def send(
        self,
        chat_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        reply_to: str | None = None,
        via: object = None,
        private: bool = False,
    ) -> str:
        """A message in the chat (``private`` changes nothing: Telegram has no message for
        one person in a group, so a refusal is a reply to their message)."""
        reply = (
            ReplyParameters(int(reply_to), allow_sending_without_reply=True)
            if reply_to is not None
            else None
        )
        message = await self.bot.send_message(
            int(chat_id), text, reply_markup=markup(keyboard), reply_parameters=reply
        )
        return str(message.message_id)

    async def edit(
        self,
        chat_id: str,
        message_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        via: object = None,
    ) -> None:
        try:
            await self.bot.edit_message_text(
                text, int(chat_id), int(message_id), reply_markup=markup(keyboard)
            )
        except RetryAfter as exc:
            raise RetryLater(retry_seconds(exc)) from exc
        except Stopping:
            log.debug("message in chat %s not edited: the bot is stopping", chat_id)
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():
                raise

    async def edit_keyboard(
        self, chat_id: str, message_id: str, keyboard: Keyboard, *, via: object = None
    ) -> None:
        await self.bot.edit_message_reply_markup(
            int(chat_id), int(message_id), reply_markup=markup(keyboard)
        )

    async def delete(self, chat_id: str, message_id: str) -> None:
        with contextlib.suppress(TelegramError):
            await self.bot.delete_message(int(chat_id), int(message_id))

    async def send_private(self, user_id: str, text: str) -> bool:
        try:
            await self.bot.send_message(int(user_id), text)
        except TelegramError as exc:
            log.info("cannot message telegram:%s privately (%s)", user_id, exc)
            return False
        return True

    async def is_admin(self, chat_id: str, user_id: str, *, via: object = None) -> bool:
        member = await self.bot.get_chat_member(int(chat_id), int(user_id))
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    async def show_working(self, chat_id: str) -> None:
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(int(chat_id), ChatAction.UPLOAD_PHOTO)

    async def send_part(self, to: Destination, part: Part, outgoing: Outgoing) -> str:
        """One photo (or document) with its caption and keyboard; an album of several
        (Telegram puts no keyboard on an album); or a text message."""
        chat = int(to.chat_id)
        marks = {BEFORE_SEND: outgoing.sending, REFUSED: outgoing.refused}
        with delivery_errors(to.chat_id):
            if not part.pictures:
                sent = await self.bot.send_message(
                    chat, part.text, reply_markup=markup(part.keyboard)
                )
            elif len(part.pictures) == 1:
                picture = part.pictures[0]
                upload = self.bot.send_document if part.as_files else self.bot.send_photo
                sent = await upload(
                    chat,
                    picture.png,
                    caption=picture.caption,
                    filename=picture.filename,
                    reply_markup=markup(part.keyboard),
                    rate_limit_args=marks,
                )
            else:
                media: list[Any] = [
                    InputMediaDocument(p.png, caption=p.caption, filename=p.filename)
                    if part.as_files
                    else InputMediaPhoto(p.png, caption=p.caption, filename=p.filename)
                    for p in part.pictures
                ]
                sent = (await self.bot.send_media_group(chat, media, rate_limit_args=marks))[0]
        return str(sent.message_id)
