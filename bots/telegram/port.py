"""``TelegramPort``: the chat core's port (``bots.common.port.ChatPort``) over a PTB ``Bot``:
messages, status edits, albums of results (documents for PNG files), chat actions."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
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

from bots.common import texts
from bots.common.delivery import RetryLater, Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import Picture, Posted
from bots.telegram.keyboards import markup
from bots.telegram.ratelimit import BEFORE_SEND, REFUSED, Stopping, retry_seconds

log = logging.getLogger(__name__)

PLATFORM = "telegram"
PHOTO_MAX_BYTES = 10 * 1024 * 1024  # Telegram's photo limit: larger images go as documents
ALBUM_MAX = 10  # items in one media group


@contextlib.contextmanager
def delivery_errors(chat_id: str) -> Iterator[None]:
    """Telegram's errors in the port's terms: flood control -> RetryLater, a chat that is gone
    or where the bot may not write -> Undeliverable."""
    try:
        yield
    except RetryAfter as exc:
        raise RetryLater(retry_seconds(exc)) from exc
    except (Forbidden, ChatMigrated) as exc:
        raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
    except BadRequest as exc:
        if "chat not found" in exc.message.lower():
            raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
        raise


class TelegramPort:
    """The Telegram side of the chat core."""

    platform = PLATFORM

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
    ) -> str:
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
        self, chat_id: str, message_id: str, text: str, keyboard: Keyboard | None = None
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

    async def edit_keyboard(self, chat_id: str, message_id: str, keyboard: Keyboard) -> None:
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

    async def is_admin(self, chat_id: str, user_id: str) -> bool:
        member = await self.bot.get_chat_member(int(chat_id), int(user_id))
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    async def show_working(self, chat_id: str) -> None:
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(int(chat_id), ChatAction.UPLOAD_PHOTO)

    async def post_images(
        self,
        chat_id: str,
        pictures: Sequence[Picture],
        keyboard: Keyboard,
        *,
        as_files: bool,
        posted: Posted,
    ) -> None:
        """One photo with its buttons; or albums of up to 10, then one message with the
        buttons (Telegram puts no keyboard on an album)."""
        with delivery_errors(chat_id):
            await self._post(int(chat_id), pictures, keyboard, as_files, posted)

    async def _post(
        self,
        chat: int,
        pictures: Sequence[Picture],
        keyboard: Keyboard,
        as_files: bool,
        posted: Posted,
    ) -> None:
        if not pictures:
            return
        if len(pictures) == 1:
            if not await posted.has("1"):
                if await posted.in_doubt("1"):
                    await self.bot.send_message(
                        chat, texts.maybe_posted([1]), reply_markup=markup(keyboard)
                    )
                else:
                    async with _answered(posted, "1"):
                        await self._send_one(chat, pictures[0], keyboard, as_files, posted, "1")
                await posted.add("1")
            return
        for start in range(0, len(pictures), ALBUM_MAX):
            part = f"album{start}"
            if await posted.has(part):
                continue
            chunk = pictures[start : start + ALBUM_MAX]
            if await posted.in_doubt(part):
                numbers = list(range(start + 1, start + len(chunk) + 1))
                await self.bot.send_message(chat, texts.maybe_posted(numbers))
            elif len(chunk) == 1:  # an album needs two items
                async with _answered(posted, part):
                    await self._send_one(chat, chunk[0], None, as_files, posted, part)
            else:
                media: list[Any] = [
                    InputMediaDocument(p.png, caption=p.caption, filename=p.filename)
                    if as_files
                    else InputMediaPhoto(p.png, caption=p.caption, filename=p.filename)
                    for p in chunk
                ]
                async with _answered(posted, part):
                    await self.bot.send_media_group(
                        chat, media, rate_limit_args=_marking(posted, part)
                    )
            await posted.add(part)
        if not await posted.has("buttons"):
            await self.bot.send_message(
                chat, texts.album_buttons_note(len(pictures)), reply_markup=markup(keyboard)
            )
            await posted.add("buttons")

    async def _send_one(
        self,
        chat: int,
        picture: Picture,
        keyboard: Keyboard | None,
        as_file: bool,
        posted: Posted,
        part: str,
    ) -> None:
        send = self.bot.send_document if as_file else self.bot.send_photo
        await send(
            chat,
            picture.png,
            caption=picture.caption,
            filename=picture.filename,
            reply_markup=markup(keyboard),
            rate_limit_args=_marking(posted, part),
        )


def _marking(posted: Posted, part: str) -> dict[str, Any]:
    """For the rate limiter (``FloodLimiter.process_request``): note ``part`` as going out
    once its turn has come, just before the upload, and as not sent when Telegram answers 429
    (a kill while it waits for its turn leaves no doubt)."""
    return {BEFORE_SEND: lambda: posted.sending(part), REFUSED: lambda: posted.not_sent(part)}


@contextlib.asynccontextmanager
async def _answered(posted: Posted, part: str) -> AsyncIterator[None]:
    """Telegram refused the upload (an answer, not a lost connection): ``part`` is surely not
    in the chat, and a later process may post it (``Posted.not_sent``)."""
    try:
        yield
    except TelegramError as exc:
        if not (isinstance(exc, TimedOut) or type(exc) is NetworkError):
            await posted.not_sent(part)
        raise
