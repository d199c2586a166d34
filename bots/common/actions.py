"""Button presses, for every platform: reroll, V/U (with the upscale cap), another style,
gallery and cancel under results; the style picker; settings. Only the person who asked may
press (a group may allow anyone). ``on_press`` returns the answer the adapter shows."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from bots.common import account, grid, keyboards, requests, texts
from bots.common.buttons import Action, BadButton, Button, parse
from bots.common.core import ChatCore
from bots.common.jobs import image_ref, imagine_draft, show_status, start_job, stop_watching
from bots.common.port import Answer, Press
from bots.common.prefs import ASPECTS, SIZES, STEPS
from core.errors import AtelierError, Forbidden, InvalidRequest, NotFound
from core.jobs import JobStatus
from core.request import GenerationRequest
from core.signing import duration_text, vary_region_url
from storage.jobs import JobRead

log = logging.getLogger(__name__)

# Buttons on results: a group may let anyone press them (running the job on their own credits).
_RESULT_ACTIONS = frozenset(
    {Action.reroll, Action.variation, Action.upscale, Action.pick_style, Action.restyle}
)

Handler = Callable[[ChatCore, Press, Button], Awaitable[str | None]]


async def on_press(core: ChatCore, press: Press) -> Answer:
    """Check who pressed what, run it, and say what happened (a refusal as an alert)."""
    try:
        pressed = parse(press.data)
    except BadButton:
        return Answer(texts.EXPIRED_BUTTON)
    who = press.who
    anyone = False
    if not who.private and pressed.action in _RESULT_ACTIONS:
        anyone = (await core.prefs.group(who.chat_id)).anyone_can_press
    if not pressed.may_press(who.user_id, anyone=anyone):
        return Answer(texts.NOT_YOURS, alert=True)
    try:
        text = await _HANDLERS[pressed.action](core, press, pressed)
    except AtelierError as exc:
        return Answer(await core.error_text(who.user_id, exc, button=True), alert=True)
    return Answer(text)


async def _job(core: ChatCore, press: Press, pressed: Button) -> JobRead:
    """The job a result button is about, checked to be the presser's (data can be forged)."""
    if pressed.job_id is None:
        raise NotFound("this button refers to no job")
    job = await core.client.jobs.job(pressed.job_id)
    if pressed.owner is not None and pressed.owner != press.who.user_id:
        return job  # on_press let a group's member press: it runs on the presser's credits
    owner = await core.client.accounts.account(core.plain_requester(press.who.user_id))
    if job.account_id != owner.id:
        raise Forbidden("that job is not yours")
    return job


async def _submit(
    core: ChatCore, press: Press, request: GenerationRequest, verb: str
) -> str | None:
    requester = await core.requester(press.who)
    prefs = await core.prefs.user(press.who.user_id)
    job = await start_job(
        core,
        press.who,
        request=request,
        requester=requester,
        # One job per press, even if the platform delivers the press twice.
        idempotency_key=f"{core.platform}:cb:{press.press_id}",
        original=prefs.original,
        reply_to=press.message_id,
    )
    return texts.accepted(verb, job.cost) if job is not None else None


async def _reroll(core: ChatCore, press: Press, pressed: Button) -> str | None:
    job = await _job(core, press, pressed)
    return await _submit(core, press, requests.reroll(job.request), "Rerolling")


async def _from_image(
    core: ChatCore, press: Press, pressed: Button, *, upscale: bool
) -> str | None:
    job = await _job(core, press, pressed)
    ref = image_ref(await core.client.jobs.job_images(job.id), pressed.index)
    if ref is None:
        raise NotFound(f"that job has no image {pressed.index}")
    png = await core.client.jobs.image_bytes(ref)
    if not upscale:
        request = requests.variation(job.request, png, ref.width, ref.height, ref.style)
        return await _submit(core, press, request, f"Making variations of image {pressed.index}")
    max_side = await core.upscale_cap(press.who.user_id, job.request.model)
    request = requests.upscale(
        job.request, png, ref.width, ref.height, ref.style, ref.seed, max_side=max_side
    )
    return await _submit(core, press, request, f"Upscaling image {pressed.index}")


async def _variation(core: ChatCore, press: Press, pressed: Button) -> str | None:
    return await _from_image(core, press, pressed, upscale=False)


async def _upscale(core: ChatCore, press: Press, pressed: Button) -> str | None:
    return await _from_image(core, press, pressed, upscale=True)


async def _pick_style(core: ChatCore, press: Press, pressed: Button) -> str | None:
    if pressed.owner is None:
        return None
    await _job(core, press, pressed)
    page = pressed.index if pressed.arg else 0
    markup = keyboards.styles(core.styles, page, pressed.owner, job_id=pressed.job_id)
    if pressed.arg and press.message_id is not None:
        await core.port.edit_keyboard(  # a page turn
            press.who.chat_id, press.message_id, markup, via=press.who.via
        )
    else:
        await core.port.send(
            press.who.chat_id, texts.restyle_picker_text(), markup, via=press.who.via
        )
    return None


async def _restyle(core: ChatCore, press: Press, pressed: Button) -> str | None:
    job = await _job(core, press, pressed)
    style = core.styles.get(keyboards.style_from_arg(core.styles, pressed.arg)).name
    return await _submit(core, press, requests.restyle(job.request, style), f"Running in {style}")


async def _gallery(core: ChatCore, press: Press, pressed: Button) -> str | None:
    who = press.who
    text = await account.gallery_link_text(core, who.user_id)
    if who.private:
        await core.port.send(who.chat_id, text, via=who.via)
        return None
    if not await core.port.send_private(who.user_id, text):
        return texts.PRIVATE_ONLY.format(command="/gallery")
    return "I sent you the link in a private chat."


async def _vary_region(core: ChatCore, press: Press, pressed: Button) -> str | None:
    """A signed link to the image's mask editor, for its owner only (it opens their gallery
    session): in a private chat here, from a group privately."""
    job = await _job(core, press, pressed)
    ref = image_ref(await core.client.job_images(job.id), pressed.index)
    if ref is None:
        raise NotFound(f"that job has no image {pressed.index}")
    url = vary_region_url(core.settings, job.account_id, ref.image_id, now=datetime.now(UTC))
    text = texts.vary_region_text(url, duration_text(core.settings.gallery_link_ttl_s))
    who = press.who
    if who.private:
        await core.port.send(who.chat_id, text)
        return None
    if not await core.port.send_private(who.user_id, text):
        return texts.PRIVATE_ONLY.format(command="Vary (Region)")
    return "I sent you the editor's link in a private chat."


async def _cancel(core: ChatCore, press: Press, pressed: Button) -> str | None:
    if pressed.job_id is None:
        return None
    who = press.who
    status = await core.client.jobs.cancel(pressed.job_id, core.plain_requester(who.user_id))
    if status is JobStatus.cancelled and press.message_id is not None:
        # Cancelled before it started: say so now, whatever the delivery stream does.
        stop_watching(core, pressed.job_id)
        credits = await core.credits_left(who.user_id)
        show_status(
            core, who.chat_id, press.message_id, texts.cancelled(credits), None, final=True,
            via=who.via,
        )
    return texts.cancel_asked(status)


async def _cancel_grid(core: ChatCore, press: Press, pressed: Button) -> str | None:
    if pressed.job_id is None:
        return None
    return await grid.cancel(core, press.who, pressed.job_id, press.message_id)


async def _styles_page(core: ChatCore, press: Press, pressed: Button) -> str | None:
    if press.message_id is None or pressed.owner is None:
        return None
    markup = keyboards.styles(core.styles, pressed.index, pressed.owner)
    await core.port.edit_keyboard(press.who.chat_id, press.message_id, markup, via=press.who.via)
    return None


async def _set_style(core: ChatCore, press: Press, pressed: Button) -> str | None:
    user = press.who.user_id
    arg = keyboards.style_from_arg(core.styles, pressed.arg)
    style = None if arg == "none" else core.styles.get(arg).name
    prefs = await core.prefs.user(user)
    await core.prefs.set_user(user, prefs.model_copy(update={"style": style}))
    if press.message_id is not None:
        await core.port.edit(
            press.who.chat_id, press.message_id, texts.style_set_text(style), via=press.who.via
        )
    return texts.style_set_text(style)


async def _setting(core: ChatCore, press: Press, pressed: Button) -> str | None:
    who = press.who
    prefs = await core.prefs.user(who.user_id)
    key, _, value = pressed.arg.partition("=")
    changes: dict[str, object]
    if key == "ar" and value in ASPECTS:
        changes = {"aspect": value}
    elif key == "size" and value in SIZES:
        # Tapping the chosen size again goes back to the model's default.
        changes = {"size": None if prefs.size == value else value}
    elif key == "steps" and value.isdigit() and int(value) in STEPS:
        # Tapping the chosen number again goes back to the model's default.
        changes = {"steps": None if prefs.steps == int(value) else int(value)}
    elif key in ("raw", "original") or (key == "nsfw" and who.private):
        changes = {key: value == "1"}
    else:
        raise InvalidRequest(f"unknown setting {pressed.arg!r}")
    prefs = prefs.model_copy(update=changes)
    await core.prefs.set_user(who.user_id, prefs)
    if press.message_id is not None:
        view = account.settings_view(
            prefs, who.user_id, private=who.private, model=core.client.models.get()
        )
        await core.port.edit(
            who.chat_id, press.message_id, view.text, view.keyboard, via=who.via
        )
    return "Saved."


async def _group_setting(core: ChatCore, press: Press, pressed: Button) -> str | None:
    who = press.who
    if who.private:
        return None
    if not await core.port.is_admin(who.chat_id, who.user_id, via=who.via):
        return texts.ADMINS_ONLY
    group = await core.prefs.group(who.chat_id)
    key, _, value = pressed.arg.partition("=")
    if key == "nsfw":
        group = group.model_copy(update={"nsfw": value == "1"})
    elif key == "anyone":
        group = group.model_copy(update={"anyone_can_press": value == "1"})
    else:
        raise InvalidRequest(f"unknown group setting {pressed.arg!r}")
    await core.prefs.set_group(who.chat_id, group)
    log.info("group %s: settings changed by admin %s: %s", who.chat_id, who.user_id, pressed.arg)
    if press.message_id is not None:
        view = account.group_settings_view(group)
        await core.port.edit(
            who.chat_id, press.message_id, view.text, view.keyboard, via=who.via
        )
    return "Saved."


async def _imagine(core: ChatCore, press: Press, pressed: Button) -> str | None:
    cost = await imagine_draft(core, press.who, pressed.arg, press.message_id)
    return texts.accepted("Imagining", cost) if cost is not None else None


_HANDLERS: dict[Action, Handler] = {
    Action.imagine: _imagine,
    Action.reroll: _reroll,
    Action.variation: _variation,
    Action.upscale: _upscale,
    Action.pick_style: _pick_style,
    Action.restyle: _restyle,
    Action.gallery: _gallery,
    Action.vary_region: _vary_region,
    Action.cancel: _cancel,
    Action.cancel_grid: _cancel_grid,
    Action.styles_page: _styles_page,
    Action.set_style: _set_style,
    Action.setting: _setting,
    Action.group_setting: _group_setting,
}
