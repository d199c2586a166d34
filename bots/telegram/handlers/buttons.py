"""Inline buttons: reroll, V/U, another style, gallery and cancel under results; the style
picker; settings. Only the person who asked may press (a group may allow anyone)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from telegram import Message, Update

from bots.common import requests, texts
from bots.common.buttons import Action, BadButton, Button, parse
from bots.common.prefs import ASPECTS, SIZES, STEPS
from bots.telegram import keyboards
from bots.telegram.handlers.commands import (
    gallery_link_text,
    group_settings_text,
    settings_text,
)
from bots.telegram.jobs import image_ref, show_status, start_job, stop_watching
from bots.telegram.services import (
    Context,
    credits_left,
    error_text,
    is_admin,
    is_private,
    plain_requester,
    requester_for,
    send_private,
    services,
)
from core.errors import AtelierError, Forbidden, InvalidRequest, NotFound
from core.jobs import JobStatus
from core.request import GenerationRequest
from storage.jobs import JobRead

log = logging.getLogger(__name__)

ANSWER_LIMIT = 200  # characters Telegram shows in a callback answer
# Buttons on results: a group may let anyone press them (running the job on their own credits).
_RESULT_ACTIONS = frozenset(
    {Action.reroll, Action.variation, Action.upscale, Action.pick_style, Action.restyle}
)

Handler = Callable[[Update, Context, Button], Awaitable[str | None]]


async def on_button(update: Update, context: Context) -> None:
    """Answer a press on any of the bot's inline buttons."""
    query, chat = update.callback_query, update.effective_chat
    if query is None:
        return
    try:
        pressed = parse(query.data or "")
    except BadButton:
        await query.answer(texts.EXPIRED_BUTTON)
        return
    svc = services(context)
    anyone = False
    if chat is not None and not is_private(chat) and pressed.action in _RESULT_ACTIONS:
        anyone = (await svc.prefs.group(chat.id)).anyone_can_press
    if not pressed.may_press(query.from_user.id, anyone=anyone):
        await query.answer(texts.NOT_YOURS, show_alert=True)
        return
    try:
        answer = await _HANDLERS[pressed.action](update, context, pressed)
    except AtelierError as exc:
        answer = await error_text(svc, query.from_user.id, exc)
        await query.answer(answer[:ANSWER_LIMIT], show_alert=True)
        return
    await query.answer(answer[:ANSWER_LIMIT] if answer else None)


async def _job(update: Update, context: Context, pressed: Button) -> JobRead:
    """The job a result button is about, checked to be the presser's (data can be forged)."""
    if pressed.job_id is None:
        raise NotFound("this button refers to no job")
    svc = services(context)
    job = await svc.client.job(pressed.job_id)
    chat, user = update.effective_chat, update.effective_user
    if user is None or chat is None:
        raise Forbidden("this button cannot be used here")
    if pressed.owner is not None and pressed.owner != str(user.id):
        return job  # on_button let a group's member press: it runs on the presser's credits
    account = await svc.client.account(plain_requester(user.id))
    if job.account_id != account.id:
        raise Forbidden("that job is not yours")
    return job


async def _submit(
    update: Update, context: Context, request: GenerationRequest, verb: str
) -> str | None:
    query, user, chat = update.callback_query, update.effective_user, update.effective_chat
    if query is None or user is None or chat is None:
        return None
    svc = services(context)
    requester = await requester_for(svc, user, chat)
    request = svc.client.prepare(request, requester)
    reply_to = query.message.message_id if isinstance(query.message, Message) else None
    status = await context.bot.send_message(
        chat.id, texts.queued(request.prompt, None), reply_to_message_id=reply_to
    )
    prefs = await svc.prefs.user(user.id)
    job = await start_job(
        svc,
        context.bot,
        request=request,
        requester=requester,
        status=status,
        # One job per press, even if Telegram delivers the press twice.
        idempotency_key=f"telegram:cb:{query.id}",
        original=prefs.original,
    )
    return texts.accepted(verb, job.cost) if job is not None else None


async def _reroll(update: Update, context: Context, pressed: Button) -> str | None:
    job = await _job(update, context, pressed)
    return await _submit(update, context, requests.reroll(job.request), "Rerolling")


async def _from_image(
    update: Update, context: Context, pressed: Button, upscale: bool
) -> str | None:
    svc = services(context)
    job = await _job(update, context, pressed)
    ref = image_ref(await svc.client.job_images(job.id), pressed.index)
    if ref is None:
        raise NotFound(f"that job has no image {pressed.index}")
    png = await svc.client.image_bytes(ref)
    if not upscale:
        request = requests.variation(job.request, png, ref.width, ref.height, ref.style)
        return await _submit(
            update, context, request, f"Making variations of image {pressed.index}"
        )
    user_id = update.effective_user.id if update.effective_user else 0
    account = await svc.client.account(plain_requester(user_id))  # whoever pays sets the cap
    max_side = min(
        svc.settings.limits.max_side,
        svc.settings.tier(account.tier).max_side,
        svc.client.models.get(job.request.model).max_width,
    )
    request = requests.upscale(
        job.request, png, ref.width, ref.height, ref.style, ref.seed, max_side=max_side
    )
    return await _submit(update, context, request, f"Upscaling image {pressed.index}")


async def _variation(update: Update, context: Context, pressed: Button) -> str | None:
    return await _from_image(update, context, pressed, upscale=False)


async def _upscale(update: Update, context: Context, pressed: Button) -> str | None:
    return await _from_image(update, context, pressed, upscale=True)


async def _pick_style(update: Update, context: Context, pressed: Button) -> str | None:
    query, chat = update.callback_query, update.effective_chat
    if query is None or chat is None or pressed.owner is None:
        return None
    await _job(update, context, pressed)
    svc = services(context)
    page = pressed.index if pressed.arg else 0
    markup = keyboards.styles(svc.styles, page, pressed.owner, job_id=pressed.job_id)
    if pressed.arg and isinstance(query.message, Message):
        await query.message.edit_reply_markup(markup)  # turning a page of the picker
    else:
        await context.bot.send_message(chat.id, texts.restyle_picker_text(), reply_markup=markup)
    return None


async def _restyle(update: Update, context: Context, pressed: Button) -> str | None:
    svc = services(context)
    job = await _job(update, context, pressed)
    style = svc.styles.get(keyboards.style_from_arg(svc.styles, pressed.arg)).name
    return await _submit(
        update, context, requests.restyle(job.request, style), f"Running in {style}"
    )


async def _gallery(update: Update, context: Context, pressed: Button) -> str | None:
    user, chat = update.effective_user, update.effective_chat
    if user is None or chat is None:
        return None
    text = await gallery_link_text(context, user.id)
    if is_private(chat):
        await context.bot.send_message(chat.id, text)
        return None
    if await send_private(context, user.id, text) is None:
        return texts.PRIVATE_ONLY.format(command="/gallery")
    return "I sent you the link in a private chat."


async def _cancel(update: Update, context: Context, pressed: Button) -> str | None:
    query, user = update.callback_query, update.effective_user
    if query is None or user is None or pressed.job_id is None:
        return None
    svc = services(context)
    status = await svc.client.cancel(pressed.job_id, plain_requester(user.id))
    if status is JobStatus.cancelled and isinstance(query.message, Message):
        # Cancelled before it started: say so now, whatever the delivery stream does.
        stop_watching(svc, pressed.job_id)
        credits = await credits_left(svc, user.id)
        show_status(
            svc,
            context.bot,
            query.message.chat_id,
            query.message.message_id,
            texts.cancelled(credits),
            None,
            final=True,
        )
    return texts.cancel_asked(status)


async def _styles_page(update: Update, context: Context, pressed: Button) -> str | None:
    query = update.callback_query
    if query is None or not isinstance(query.message, Message) or pressed.owner is None:
        return None
    markup = keyboards.styles(services(context).styles, pressed.index, pressed.owner)
    await query.message.edit_reply_markup(markup)
    return None


async def _set_style(update: Update, context: Context, pressed: Button) -> str | None:
    query, user = update.callback_query, update.effective_user
    if query is None or user is None:
        return None
    svc = services(context)
    arg = keyboards.style_from_arg(svc.styles, pressed.arg)
    style = None if arg == "none" else svc.styles.get(arg).name
    prefs = await svc.prefs.user(user.id)
    await svc.prefs.set_user(user.id, prefs.model_copy(update={"style": style}))
    if isinstance(query.message, Message):
        await query.message.edit_text(texts.style_set_text(style))
    return texts.style_set_text(style)


async def _setting(update: Update, context: Context, pressed: Button) -> str | None:
    query, user, chat = update.callback_query, update.effective_user, update.effective_chat
    if query is None or user is None or chat is None:
        return None
    svc = services(context)
    prefs = await svc.prefs.user(user.id)
    key, _, value = pressed.arg.partition("=")
    changes: dict[str, object]
    if key == "ar" and value in ASPECTS:
        changes = {"aspect": value}
    elif key == "size" and value in SIZES:
        changes = {"size": value}
    elif key == "steps" and value.isdigit() and int(value) in STEPS:
        # Tapping the chosen number again goes back to the model's default.
        changes = {"steps": None if prefs.steps == int(value) else int(value)}
    elif key in ("raw", "original") or (key == "nsfw" and is_private(chat)):
        changes = {key: value == "1"}
    else:
        raise InvalidRequest(f"unknown setting {pressed.arg!r}")
    prefs = prefs.model_copy(update=changes)
    await svc.prefs.set_user(user.id, prefs)
    if isinstance(query.message, Message):
        markup = keyboards.settings(prefs, str(user.id), private=is_private(chat))
        steps = svc.client.models.get().default_steps
        await query.message.edit_text(settings_text(prefs.model_dump(), steps), reply_markup=markup)
    return "Saved."


async def _group_setting(update: Update, context: Context, pressed: Button) -> str | None:
    query, user, chat = update.callback_query, update.effective_user, update.effective_chat
    if query is None or user is None or chat is None or is_private(chat):
        return None
    if not await is_admin(context, chat.id, user.id):
        return texts.ADMINS_ONLY
    svc = services(context)
    group = await svc.prefs.group(chat.id)
    key, _, value = pressed.arg.partition("=")
    if key == "nsfw":
        group = group.model_copy(update={"nsfw": value == "1"})
    elif key == "anyone":
        group = group.model_copy(update={"anyone_can_press": value == "1"})
    else:
        raise InvalidRequest(f"unknown group setting {pressed.arg!r}")
    await svc.prefs.set_group(chat.id, group)
    log.info("group %s: settings changed by admin %s: %s", chat.id, user.id, pressed.arg)
    if isinstance(query.message, Message):
        await query.message.edit_text(
            group_settings_text(group.model_dump()), reply_markup=keyboards.group_settings(group)
        )
    return "Saved."


_HANDLERS: dict[Action, Handler] = {
    Action.reroll: _reroll,
    Action.variation: _variation,
    Action.upscale: _upscale,
    Action.pick_style: _pick_style,
    Action.restyle: _restyle,
    Action.gallery: _gallery,
    Action.cancel: _cancel,
    Action.styles_page: _styles_page,
    Action.set_style: _set_style,
    Action.setting: _setting,
    Action.group_setting: _group_setting,
}
