"""A job's life in a chat, for every platform: submit it behind one status message, follow its
progress (throttled edits, a "working" sign), and post the results once when its delivery
event arrives (``deliver`` is the delivery loop's handler)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bots.common import account, keyboards, texts
from bots.common.core import ChatCore
from bots.common.delivery import Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import Destination, Picture, Who
from bots.common.posting import Posted, post_result
from bots.common.requests import (
    ModelSizes,
    controlled,
    img2img,
    parse_prompt,
    upscaled_size,
)
from bots.common.state import DRAFT, DRAFT_TTL_S
from cluster.events import EventKind, ImageRef, JobEvent
from cluster.jobs import Quote, SubmittedJob
from core.errors import AtelierError, InvalidRequest, NotFound
from core.flags import CONTROL_NEEDS_PICTURE
from core.images import validate_image
from core.jobs import DeliveryTarget, Requester
from core.offload import run_heavy
from core.request import GenerationRequest

log = logging.getLogger(__name__)

WORKING_EVERY_S = 4.5  # Telegram shows an action for 5 s, or until the bot sends something
WATCH_TIMEOUT_S = 3600.0


def start(core: ChatCore) -> None:
    """Start the core: deliver, and follow again the jobs in flight that a previous run of the
    bot was following (their status messages keep moving after a restart)."""
    core.start()
    core.spawn(resume(core), "resume-following")


async def resume(core: ChatCore) -> None:
    """Follow this platform's queued and running jobs again."""
    try:
        live = await core.client.jobs.live_jobs(core.platform)
    except Exception as exc:  # the store unreachable: deliveries still come, progress not
        log.warning("could not list the jobs in flight (%s); their progress is not shown", exc)
        return
    followed = 0
    for job in live:
        target = job.delivery
        if not target.chat_id or not target.message_id or job.id in core.watchers:
            continue
        if target.extra.get("grid"):
            continue  # a grid's status counts cells as their deliveries come
        owner = target.extra.get("owner", "")
        follow(core, job.id, target.chat_id, target.message_id, job.request.prompt, owner)
        followed += 1
    if followed:
        log.info("following %d jobs in flight again", followed)


@dataclass(frozen=True, slots=True)
class Checked:
    """A prompt checked and priced for its asker (``check``): what ``start_checked`` posts and
    submits, without preparing it again."""

    quote: Quote
    requester: Requester
    idempotency_key: str
    original: bool = False  # PNG files asked for


async def check(
    core: ChatCore, who: Who, text: str, *, idempotency_key: str, photo: bytes | None = None
) -> Checked:
    """Everything a prompt (and a photo to redraw) can be refused for before anything is
    posted: the request with the person's defaults, validated and priced. Raises the refusal;
    a platform that must choose where to answer before answering (Discord) calls it first."""
    requester = await core.requester(who)
    request, original = await _request_from(core, who, text, photo)
    quote = await core.client.jobs.admit(request, requester, idempotency_key)
    return Checked(quote, requester, idempotency_key, original)


async def imagine(
    core: ChatCore,
    who: Who,
    text: str,
    *,
    idempotency_key: str,
    photo: bytes | None = None,
) -> SubmittedJob | None:
    """Make images from a prompt with flags (and a photo to redraw). Everything is checked
    and priced before anything is posted: a refusal is one line, never a status first."""
    try:
        checked = await check(core, who, text, idempotency_key=idempotency_key, photo=photo)
        return await start_checked(core, who, checked)
    except AtelierError as exc:
        await refuse(core, who, exc)
        return None


async def refuse(core: ChatCore, who: Who, exc: AtelierError) -> None:
    """Say why a prompt was refused, in one line, where refusals go: to the asker alone where
    the platform can (a Discord ephemeral answer, which replaces nothing public), else as a
    reply to their message."""
    text = await core.error_text(who.user_id, exc)
    await core.port.send(
        who.chat_id, text, reply_to=who.message_id, via=who.via, private=True
    )


async def preview(core: ChatCore, who: Who, text: str, *, draft_id: str) -> None:
    """Plain text (not a command): show what it would make and what it costs, with an Imagine
    button, instead of charging at once. Refusals are one line, as for ``imagine``."""
    try:
        requester = await core.requester(who)
        request, _ = await _request_from(core, who, text, None)
        quote = await core.client.jobs.admit(request, requester, draft_key(core, who, draft_id))
    except AtelierError as exc:
        await refuse(core, who, exc)
        return
    if quote.repeat_of is not None:
        return  # the same message again, already imagined
    key = DRAFT.format(platform=core.platform, chat=who.chat_id, draft=draft_id)
    await core.state.set(key, text, DRAFT_TTL_S)
    await core.port.send(
        who.chat_id,
        texts.preview(quote.request, quote.cost, quote.credits),
        keyboards.imagine(who.user_id, draft_id),
        reply_to=who.message_id,
        via=who.via,
    )


def draft_key(core: ChatCore, who: Who, draft_id: str) -> str:
    """The idempotency key of the job a preview makes: one job however often it is pressed."""
    return f"{core.platform}:{who.chat_id}:{draft_id}"


async def imagine_draft(
    core: ChatCore, who: Who, draft_id: str, reply_to: str | None
) -> int | None:
    """Make the job a preview showed; its cost, or None when it was made already."""
    text = await core.state.get(
        DRAFT.format(platform=core.platform, chat=who.chat_id, draft=draft_id)
    )
    if text is None:
        raise NotFound("this preview has expired; send the text again")
    checked = await check(core, who, text, idempotency_key=draft_key(core, who, draft_id))
    job = await start_checked(core, who, checked, reply_to=reply_to)
    return job.cost if job is not None else None


async def _request_from(
    core: ChatCore, who: Who, text: str, photo: bytes | None
) -> tuple[GenerationRequest, bool]:
    """The request a prompt (and a photo) makes with the person's defaults; and whether
    they asked for PNG files."""
    limits = core.settings.limits
    prefs = await core.prefs.user(who.user_id)
    # Off the event loop, which every bot and the web app share: parsing normalises and
    # checks the text; a photo is decoded and re-encoded (seconds for a big one).
    parsed = await asyncio.to_thread(parse_prompt, text, prefs, core.styles, limits)
    request = parsed.request
    if parsed.control is not None and photo is None:
        raise InvalidRequest(CONTROL_NEEDS_PICTURE)
    if photo is not None:
        image = await run_heavy(
            validate_image,
            photo,
            max_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_upload_pixels,
            purpose="control picture" if parsed.control is not None else "photo",
        )
        # The model it runs on (the default one when it names none) bounds the size.
        spec = core.client.models.get((await core.client.runnable.with_default(request)).model)
        sizes = ModelSizes(spec.default_width, spec.default_height, spec.max_width,
                           spec.max_height)
        # With --control the photo steers a new picture (a ControlNet unit), not redrawn.
        make = controlled if parsed.control is not None else img2img
        request = make(parsed, image.png, image.width, image.height, sizes)
    return request, parsed.original


async def start_job(
    core: ChatCore,
    who: Who,
    *,
    request: GenerationRequest,
    requester: Requester,
    idempotency_key: str,
    original: bool = False,
    reply_to: str | None = None,
) -> SubmittedJob | None:
    """Check and price ``request``, then ``start_checked``. Raises a refusal."""
    quote = await core.client.jobs.admit(request, requester, idempotency_key)
    checked = Checked(quote, requester, idempotency_key, original)
    return await start_checked(core, who, checked, reply_to=reply_to)


async def start_checked(
    core: ChatCore, who: Who, checked: Checked, *, reply_to: str | None = None
) -> SubmittedJob | None:
    """Post a status message and submit the checked request behind it: the delivery event
    names that message, so the result finds its way back even after a restart. A refusal
    raises with nothing left posted (the caller says it in one line, where the platform
    shows refusals): one that only submit sees (credits spent, or the tier's slots taken,
    since the check) removes the status first."""
    chat, quote, requester = who.chat_id, checked.quote, checked.requester
    if quote.repeat_of is not None:
        # The same update again (a webhook retry, a redelivery): the first status message
        # already follows that job; say nothing more.
        log.info("job %s: repeated update %s", quote.repeat_of, checked.idempotency_key)
        return None
    request = quote.request
    status = await core.port.send(
        chat, texts.queued(request.prompt, None), reply_to=reply_to or who.message_id,
        via=who.via,
    )
    if status is None:
        raise RuntimeError(f"the {core.platform} port gave no id for the status in {chat}")
    delivery = DeliveryTarget(
        frontend=core.platform,
        chat_id=chat,
        message_id=status,
        extra={
            "owner": requester.platform_user_id,
            "original": "1" if checked.original else "",
        },
    )
    try:
        job = await core.client.jobs.submit(quote, delivery)
    except AtelierError:
        await core.port.delete(chat, status)  # never a "Queued" status for no job
        raise
    if not job.created:
        # A twin of this update got in between the check and now: that one's status follows.
        log.info("job %s: repeated update %s", job.job_id, checked.idempotency_key)
        await core.port.delete(chat, status)
        return None
    owner = requester.platform_user_id
    show_status(
        core,
        chat,
        status,
        texts.queued(request.prompt, job.position),
        keyboards.cancel(job.job_id, owner),
    )
    follow(core, job.job_id, chat, status, request.prompt, owner)
    return job


def show_status(
    core: ChatCore,
    chat_id: str,
    message_id: str,
    text: str,
    keyboard: Keyboard | None,
    *,
    final: bool = False,
    via: object = None,
) -> None:
    """Show ``text`` on a job's status message soon (edits are throttled per chat). ``via``:
    the event being answered (``Who.via``), when a press on that message asks for it."""

    async def send(payload: tuple[str, Keyboard | None]) -> None:
        await core.port.edit(chat_id, message_id, payload[0], payload[1], via=via)

    core.editor.update(chat_id, message_id, (text, keyboard), send, final=final)


def follow(
    core: ChatCore, job_id: str, chat_id: str, message_id: str, prompt: str, owner: str
) -> None:
    """Keep the status of ``job_id`` up to date until it ends (in a task of its own)."""
    if job_id in core.watchers:
        return
    task = asyncio.create_task(
        _watch(core, job_id, chat_id, message_id, prompt, owner), name=f"watch:{job_id}"
    )
    core.watchers[job_id] = task
    task.add_done_callback(lambda _: core.watchers.pop(job_id, None))


def stop_watching(core: ChatCore, job_id: str) -> None:
    watcher = core.watchers.pop(job_id, None)
    if watcher is not None:
        watcher.cancel()


async def _watch(
    core: ChatCore, job_id: str, chat_id: str, message_id: str, prompt: str, owner: str
) -> None:
    """Status edits and the "working" sign until the job ends (the result is posted by the
    delivery loop, which also stops this task)."""
    markup = keyboards.cancel(job_id, owner)
    last_sign = 0.0
    try:
        async with (
            asyncio.timeout(WATCH_TIMEOUT_S),
            contextlib.aclosing(core.client.jobs.events(job_id)) as events,
        ):
            async for event in events:
                if event.terminal:
                    return
                if event.kind is EventKind.queued:
                    show_status(
                        core, chat_id, message_id, texts.queued(prompt, event.position), markup
                    )
                    continue
                show_status(
                    core,
                    chat_id,
                    message_id,
                    texts.rendering(prompt, event.step, event.total),
                    markup,
                )
                if time.monotonic() - last_sign >= WORKING_EVERY_S:
                    last_sign = time.monotonic()
                    await core.port.show_working(chat_id)
    except TimeoutError:
        log.info("job %s: stopped following it after %.0f s", job_id, WATCH_TIMEOUT_S)
    except AtelierError as exc:
        log.info("job %s: progress unavailable (%s)", job_id, exc)


async def deliver(core: ChatCore, event: JobEvent) -> None:
    """Post a finished job to its chat (the delivery loop's handler): the images with their
    buttons, then the final status. RetryLater / Undeliverable come from the port."""
    target = event.delivery
    if target is None or target.frontend != core.platform or not target.chat_id:
        raise Undeliverable(f"job {event.job_id} has no {core.platform} chat to deliver to")
    if target.extra.get("grid"):
        # Imported here: bots.common.grid builds on this module.
        from bots.common import grid

        await grid.deliver_cell(core, event)
        return
    stop_watching(core, event.job_id)
    chat_id = target.chat_id
    owner = target.extra.get("owner", "")
    if event.kind is EventKind.done:
        to = Destination(chat_id, owner, target.message_id or None, gallery_text(core, owner))
        prompt = await _post_images(core, event, to, bool(target.extra.get("original")))
        final = texts.finished(prompt, len(event.images))
    elif event.kind is EventKind.failed:
        final = texts.failed(event.reason, await core.credits_left(owner) if owner else None)
    else:
        final = texts.cancelled(await core.credits_left(owner) if owner else None)
    if target.message_id:
        show_status(core, chat_id, target.message_id, final, None, final=True)


def gallery_text(core: ChatCore, owner: str) -> Callable[[], Awaitable[str]] | None:
    """The asker's gallery link, made only when a result needs it."""
    if not owner:
        return None

    async def text() -> str:
        return await account.gallery_link_text(core, owner)

    return text


async def _post_images(core: ChatCore, event: JobEvent, to: Destination, original: bool) -> str:
    """Post the images (each part once); returns the job's prompt."""
    job = await core.client.jobs.job(event.job_id)
    refs = sorted(event.images, key=lambda r: r.index)
    if not refs:
        return job.request.prompt
    pngs = [await core.client.jobs.image_bytes(ref) for ref in refs]
    pictures = [
        Picture(
            png,
            f"atelier-{job.id[:8]}-{ref.index + 1}.png",
            texts.caption(job.request, ref.seed, ref.style),
        )
        for png, ref in zip(pngs, refs, strict=True)
    ]
    as_files = original or any(len(png) > core.port.photo_max_bytes for png in pngs)
    # U buttons only on images an upscale can grow (the owner's tier and the model cap it).
    owner = to.owner
    cap = await core.upscale_cap(owner, job.request.model) if owner else 0
    fits = [n for n, ref in enumerate(refs, 1) if upscaled_size(ref.width, ref.height, cap)]
    keyboard = keyboards.results(job.id, owner, len(refs), upscale=fits)
    # A ControlNet job's control map first, so the person sees what the images followed.
    preview = await core.client.jobs.control_preview(job.request)
    control = (Picture(preview, f"atelier-{job.id[:8]}-control.png",
                       texts.control_caption(job.request)) if preview is not None else None)
    await post_result(
        core.port,
        to,
        pictures,
        keyboard,
        as_files=as_files,
        posted=Posted(core.state, core.platform, job.id, here=core.posted_here),
        control=control,
    )
    return job.request.prompt


def image_ref(refs: list[ImageRef], number: int) -> ImageRef | None:
    """The ``number``-th image (1-based, as on the V/U buttons) of a job."""
    ordered = sorted(refs, key=lambda r: r.index)
    return ordered[number - 1] if 1 <= number <= len(ordered) else None
