"""Making images: /imagine, plain text in private chats, photos with a caption (img2img), and
a clear answer for what the bot cannot use (stickers, voice messages, ...)."""

from __future__ import annotations

import logging

from telegram import Message, MessageEntity, Update
from telegram.ext import ApplicationHandlerStop, filters

from bots.common import grid as grid_uc
from bots.common import jobs, texts
from bots.common.state import ALBUM_SEEN, ALBUM_SEEN_TTL_S
from bots.telegram.services import PLATFORM, Context, core_of, is_private, reply_error, who_of
from core.errors import AtelierError, ImageRejected, PromptTooLong
from core.flags import command_limit
from core.request import check_text_length

log = logging.getLogger(__name__)

DOWNLOAD_MAX_BYTES = 20 * 1024 * 1024


class TooLong(filters.MessageFilter):
    """A message whose text (or caption) has more than ``limit`` characters."""

    def __init__(self, limit: int) -> None:
        super().__init__(name=f"TooLong({limit})")
        self.limit = limit

    def filter(self, message: Message) -> bool:
        return len(message.text or message.caption or "") > self.limit


async def too_long(update: Update, context: Context) -> None:
    """Refuse a text longer than any command may be (a private one, or a command) before the
    other handlers read it: each command handler splits the whole text, on the loop that
    the web app shares."""
    message = update.effective_message
    if message is not None:
        text = message.text or message.caption or ""
        if is_private(update.effective_chat) or text.startswith("/"):
            try:
                check_text_length(text, command_limit(core_of(context).settings.limits),
                                  what="the text")
            except PromptTooLong as exc:
                await reply_error(update, context, exc)
    raise ApplicationHandlerStop


async def imagine(update: Update, context: Context) -> None:
    """Make images from /imagine <prompt> [flags]."""
    message = update.effective_message
    if message is None or message.text is None:
        return
    text = _after_command(message)
    if not text:
        await message.reply_text(texts.IMAGINE_USAGE)
        return
    await _make(update, context, text)


async def grid(update: Update, context: Context) -> None:
    """An X/Y/Z grid from /grid <prompt> [flags] --x cfg=3,7,11 [--y ...] [--z ...]."""
    message, who = update.effective_message, who_of(update)
    if message is None or message.text is None or who is None:
        return
    text = _after_command(message)
    if not text:
        await message.reply_text(texts.GRID_USAGE)
        return
    await grid_uc.grid(
        core_of(context), who, text,
        # The same update delivered twice makes one grid.
        idempotency_key=f"telegram:{who.chat_id}:{message.message_id}",
    )


async def prompt_text(update: Update, context: Context) -> None:
    """Plain text in a private chat: a preview with an Imagine button (or, when
    ATELIER_TELEGRAM_PLAIN_TEXT_PREVIEW is off, a prompt at once)."""
    message, who = update.effective_message, who_of(update)
    if message is None or not message.text or who is None:
        return
    core = core_of(context)
    if not core.settings.telegram_plain_text_preview:
        await _make(update, context, message.text.strip())
        return
    await jobs.preview(core, who, message.text.strip(), draft_id=str(message.message_id))


async def photo(update: Update, context: Context) -> None:
    """Redraw a photo, with its caption as the prompt (img2img)."""
    message, chat = update.effective_message, update.effective_chat
    if message is None:
        return
    core = core_of(context)
    caption = _addressed_caption(message, context.bot.username, is_private(chat))
    if message.media_group_id and not caption:
        # Telegram puts an album's caption on one photo: that one is redrawn; say so, once.
        if caption == "" and is_private(chat):
            key = ALBUM_SEEN.format(platform=PLATFORM, album=message.media_group_id)
            if await core.state.add(key, "1", ALBUM_SEEN_TTL_S):
                await message.reply_text(texts.ONE_PHOTO_AT_A_TIME)
        return
    if caption is None:
        return  # a group photo not meant for the bot
    if not caption:
        await message.reply_text(texts.PHOTO_NEEDS_CAPTION)
        return
    attachment = message.photo[-1] if message.photo else message.document
    if attachment is None:
        return
    try:
        # Bots may download files up to 20 MB from Telegram.
        size = attachment.file_size or 0
        limit = min(core.settings.limits.max_upload_bytes, DOWNLOAD_MAX_BYTES)
        if size > limit:
            # Checked before downloading: Telegram says the size up front.
            raise ImageRejected(
                f"the photo is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.1f} MB"
            )
        data = await (await attachment.get_file()).download_as_bytearray()
    except AtelierError as exc:
        await reply_error(update, context, exc)
        return
    await _make(update, context, caption, photo=bytes(data))


async def unsupported(update: Update, context: Context) -> None:
    """Say clearly what the bot can use when it gets something else."""
    message = update.effective_message
    if message is None:
        return
    await message.reply_text(texts.UNSUPPORTED.format(what=_kind_of(message)))


async def _make(update: Update, context: Context, text: str, photo: bytes | None = None) -> None:
    who, message = who_of(update), update.effective_message
    if who is None or message is None:
        return
    await jobs.imagine(
        core_of(context),
        who,
        text,
        photo=photo,
        # The same update delivered twice (webhook retries, a restart) makes one job.
        idempotency_key=f"telegram:{who.chat_id}:{message.message_id}",
    )


def _after_command(message: Message) -> str:
    """The text after the leading /command (and its @botname), newlines kept."""
    text = message.text or ""
    for entity in message.entities:
        if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            return text[entity.length :].strip()
    return text.strip()


def _addressed_caption(message: Message, bot_username: str, private: bool) -> str | None:
    """The prompt in a photo's caption; None when a group photo is not addressed to the bot
    (a caption starting with /imagine, or mentioning @botname)."""
    caption = (message.caption or "").strip()
    if private:
        first = caption.split(maxsplit=1)
        if first and first[0].split("@")[0].lower() == "/imagine":
            return first[1].strip() if len(first) > 1 else ""
        return caption
    mention = f"@{bot_username}".lower()
    words = caption.split(maxsplit=1)
    if not words:
        return None
    head = words[0].lower()
    if head in ("/imagine", f"/imagine{mention}", mention):
        return words[1].strip() if len(words) > 1 else ""
    return None


def _kind_of(message: Message) -> str:
    kinds = (
        ("sticker", "A sticker"),
        ("voice", "A voice message"),
        ("audio", "An audio file"),
        ("video", "A video"),
        ("video_note", "A video message"),
        ("animation", "A GIF"),
        ("document", "That file"),
        ("location", "A location"),
        ("contact", "A contact"),
        ("poll", "A poll"),
    )
    for attr, name in kinds:
        if getattr(message, attr, None):
            return name
    return "That"
