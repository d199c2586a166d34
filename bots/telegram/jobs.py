"""A job's life in a chat: submit it behind one status message, follow its progress (throttled
edits, the upload_photo action), and post the results when its delivery event arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from telegram import Bot, InlineKeyboardMarkup, InputMediaDocument, InputMediaPhoto, Message
from telegram.constants import ChatAction
from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter, TelegramError

from bots.common import texts
from bots.common.delivery import RetryLater, Undeliverable
from bots.common.state import POSTED, POSTED_TTL_S
from bots.telegram import keyboards
from bots.telegram.ratelimit import Stopping, retry_seconds
from bots.telegram.services import PLATFORM, Services, credits_left
from cluster.client import SubmittedJob
from cluster.events import EventKind, ImageRef, JobEvent
from core.errors import AtelierError
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest

log = logging.getLogger(__name__)

ALBUM_MAX = 10  # items in one media group
CHAT_ACTION_EVERY_S = 4.5  # an action shows for 5 s, or until the bot sends something
WATCH_TIMEOUT_S = 3600.0


async def start_job(
    svc: Services,
    bot: Bot,
    *,
    request: GenerationRequest,
    requester: Requester,
    status: Message,
    idempotency_key: str,
    original: bool = False,
) -> SubmittedJob | None:
    """Submit behind ``status`` (already sent): the delivery event names it, so the result
    finds its way back even after a restart. Errors end up in the status message itself."""
    delivery = DeliveryTarget(
        frontend=PLATFORM,
        chat_id=str(status.chat_id),
        message_id=str(status.message_id),
        extra={"owner": requester.platform_user_id, "original": "1" if original else ""},
    )
    try:
        job = await svc.client.submit(request, requester, delivery, idempotency_key)
    except AtelierError as exc:
        credits = await credits_left(svc, requester.platform_user_id)
        await status.edit_text(texts.error_line(exc, credits))
        return None
    if not job.created:
        # The same update again (a webhook retry, a redelivery): the first status message
        # already follows this job.
        log.info("job %s: repeated update %s", job.job_id, idempotency_key)
        with contextlib.suppress(TelegramError):
            await status.delete()
        return None
    owner = requester.platform_user_id
    show_status(
        svc,
        bot,
        status.chat_id,
        status.message_id,
        texts.queued(request.prompt, job.position),
        keyboards.cancel(job.job_id, owner),
    )
    task = asyncio.create_task(
        _watch(svc, bot, job.job_id, status.chat_id, status.message_id, request.prompt, owner),
        name=f"watch:{job.job_id}",
    )
    svc.watchers[job.job_id] = task
    task.add_done_callback(lambda _: svc.watchers.pop(job.job_id, None))
    return job


def show_status(
    svc: Services,
    bot: Bot,
    chat_id: int,
    message_id: int,
    text: str,
    markup: InlineKeyboardMarkup | None,
    *,
    final: bool = False,
) -> None:
    async def send(payload: tuple[str, InlineKeyboardMarkup | None]) -> None:
        try:
            await bot.edit_message_text(payload[0], chat_id, message_id, reply_markup=payload[1])
        except RetryAfter as exc:
            raise RetryLater(retry_seconds(exc)) from exc
        except Stopping:
            log.debug("status of chat %s not updated: the bot is stopping", chat_id)
        except BadRequest as exc:
            if "not modified" not in exc.message.lower():
                raise

    svc.editor.update(str(chat_id), str(message_id), (text, markup), send, final=final)


def stop_watching(svc: Services, job_id: str) -> None:
    watcher = svc.watchers.pop(job_id, None)
    if watcher is not None:
        watcher.cancel()


async def _watch(
    svc: Services, bot: Bot, job_id: str, chat_id: int, message_id: int, prompt: str, owner: str
) -> None:
    """Status edits and the upload_photo action until the job ends (the result is posted by
    the delivery loop, which also stops this task)."""
    markup = keyboards.cancel(job_id, owner)
    last_action = 0.0
    try:
        async with (
            asyncio.timeout(WATCH_TIMEOUT_S),
            contextlib.aclosing(svc.client.events(job_id)) as events,
        ):
            async for event in events:
                if event.terminal:
                    return
                if event.kind is EventKind.queued:
                    show_status(
                        svc, bot, chat_id, message_id, texts.queued(prompt, event.position), markup
                    )
                    continue
                show_status(
                    svc,
                    bot,
                    chat_id,
                    message_id,
                    texts.rendering(prompt, event.step, event.total),
                    markup,
                )
                if time.monotonic() - last_action >= CHAT_ACTION_EVERY_S:
                    last_action = time.monotonic()
                    with contextlib.suppress(TelegramError):
                        await bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)
    except TimeoutError:
        log.info("job %s: stopped following it after %.0f s", job_id, WATCH_TIMEOUT_S)
    except AtelierError as exc:
        log.info("job %s: progress unavailable (%s)", job_id, exc)


async def deliver(svc: Services, bot: Bot, event: JobEvent) -> None:
    """Post a finished job to its chat (the delivery loop's handler)."""
    target = event.delivery
    if target is None or target.frontend != PLATFORM or not target.chat_id:
        raise Undeliverable(f"job {event.job_id} has no Telegram chat to deliver to")
    stop_watching(svc, event.job_id)
    chat_id = int(target.chat_id)
    owner = target.extra.get("owner", "")
    try:
        if event.kind is EventKind.done:
            await _post_images(svc, bot, event, chat_id, owner, bool(target.extra.get("original")))
            final = texts.finished(await _prompt(svc, event.job_id), len(event.images))
        elif event.kind is EventKind.failed:
            final = texts.failed(event.reason, await credits_left(svc, owner) if owner else None)
        else:
            final = texts.cancelled(await credits_left(svc, owner) if owner else None)
    except RetryAfter as exc:
        raise RetryLater(retry_seconds(exc)) from exc
    except (Forbidden, ChatMigrated) as exc:
        raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
    except BadRequest as exc:
        if "chat not found" in exc.message.lower():
            raise Undeliverable(f"chat {chat_id}: {exc.message}") from exc
        raise
    if target.message_id:
        show_status(svc, bot, chat_id, int(target.message_id), final, None, final=True)


async def _prompt(svc: Services, job_id: str) -> str:
    return (await svc.client.job(job_id)).request.prompt


async def _post_images(
    svc: Services, bot: Bot, event: JobEvent, chat_id: int, owner: str, original: bool
) -> None:
    job = await svc.client.job(event.job_id)
    refs = sorted(event.images, key=lambda r: r.index)
    if not refs:
        return
    pngs = [await svc.client.image_bytes(ref) for ref in refs]
    as_files = original or any(len(png) > svc.photo_max_bytes for png in pngs)
    markup = keyboards.results(job.id, owner, len(refs))
    posted = _Posted(svc, job.id)
    captions = [texts.caption(job.request, ref.seed, ref.style) for ref in refs]
    names = [f"atelier-{job.id[:8]}-{ref.index + 1}.png" for ref in refs]
    if len(refs) == 1:
        if not await posted.has("1"):
            await _send_one(bot, chat_id, pngs[0], names[0], captions[0], markup, as_files)
            await posted.add("1")
        return
    for start in range(0, len(refs), ALBUM_MAX):
        part = f"album{start}"
        if await posted.has(part):
            continue
        chunk = range(start, min(start + ALBUM_MAX, len(refs)))
        if len(chunk) == 1:  # an album needs two items
            i = chunk[0]
            await _send_one(bot, chat_id, pngs[i], names[i], captions[i], None, as_files)
        else:
            media: list[Any] = [
                InputMediaDocument(pngs[i], caption=captions[i], filename=names[i])
                if as_files
                else InputMediaPhoto(pngs[i], caption=captions[i], filename=names[i])
                for i in chunk
            ]
            await bot.send_media_group(chat_id, media)
        await posted.add(part)
    if not await posted.has("buttons"):
        await bot.send_message(chat_id, texts.album_buttons_note(len(refs)), reply_markup=markup)
        await posted.add("buttons")


class _Posted:
    """The parts of a job's result already in the chat, kept in the bot state: a delivery
    retried after flood control, or after a restart, posts only what is missing."""

    def __init__(self, svc: Services, job_id: str) -> None:
        self.state = svc.state
        self.job_id = job_id

    def _key(self, part: str) -> str:
        return POSTED.format(platform=PLATFORM, job=self.job_id, part=part)

    async def has(self, part: str) -> bool:
        return await self.state.get(self._key(part)) is not None

    async def add(self, part: str) -> None:
        await self.state.set(self._key(part), "1", POSTED_TTL_S)


async def _send_one(
    bot: Bot,
    chat_id: int,
    png: bytes,
    name: str,
    caption: str,
    markup: InlineKeyboardMarkup | None,
    as_file: bool,
) -> None:
    if as_file:
        await bot.send_document(chat_id, png, caption=caption, filename=name, reply_markup=markup)
    else:
        await bot.send_photo(chat_id, png, caption=caption, filename=name, reply_markup=markup)


def image_ref(refs: list[ImageRef], number: int) -> ImageRef | None:
    """The ``number``-th image (1-based, as on the V/U buttons) of a job."""
    ordered = sorted(refs, key=lambda r: r.index)
    return ordered[number - 1] if 1 <= number <= len(ordered) else None
