"""Account commands: /start, /help, /credits, /gallery, /history, /cancel, /link, /styles and
/settings (a group's settings for its admins)."""

from __future__ import annotations

from datetime import UTC, datetime

from telegram import Update

from bots.common import texts
from bots.telegram import keyboards
from bots.telegram.services import (
    Context,
    display_name,
    is_admin,
    is_private,
    plain_requester,
    reply_error,
    send_private,
    services,
)
from core.errors import AtelierError, Conflict
from core.jobs import JobStatus
from core.signing import sign


async def start(update: Update, context: Context) -> None:
    """Welcome the person: credits and how to start."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    balance = await services(context).client.balance(plain_requester(user.id))
    await message.reply_text(texts.welcome(display_name(user), balance, datetime.now(UTC)))


async def help_command(update: Update, context: Context) -> None:
    """List the commands and flags."""
    if update.effective_message is not None:
        models = await services(context).client.available_models()
        await update.effective_message.reply_text(texts.help_text(models))


async def credits(update: Update, context: Context) -> None:
    """Show daily credits left, packs with their expiry and the next reset."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    balance = await services(context).client.balance(plain_requester(user.id))
    await message.reply_text(texts.credits_text(balance, datetime.now(UTC)))


async def gallery(update: Update, context: Context) -> None:
    """Send a signed, expiring link to the person's gallery (privately)."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    text = await gallery_link_text(context, user.id)
    if is_private(update.effective_chat):
        await message.reply_text(text)
    elif await send_private(context, user.id, text) is None:
        await message.reply_text(texts.PRIVATE_ONLY.format(command="/gallery"))


async def gallery_link_text(context: Context, user_id: int) -> str:
    svc = services(context)
    account = await svc.client.account(plain_requester(user_id))
    token = sign(
        svc.settings.resolved_signing_key,
        subject=str(account.id),
        purpose="gallery",
        now=datetime.now(UTC),
        ttl=svc.gallery_ttl,
    )
    url = f"{svc.settings.public_base_url.rstrip('/')}/g/{token}"
    return texts.gallery_text(url, svc.gallery_ttl.days)


async def history(update: Update, context: Context) -> None:
    """List the last 5 jobs with buttons to run them again."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    jobs = await services(context).client.history(plain_requester(user.id), limit=5)
    markup = keyboards.history(jobs, str(user.id))
    await message.reply_text(texts.history_text(jobs), reply_markup=markup)


async def cancel(update: Update, context: Context) -> None:
    """Cancel the person's latest queued or running job."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    client = services(context).client
    requester = plain_requester(user.id)
    jobs = await client.history(requester, limit=20)
    live = [j for j in jobs if not j.status.finished]
    if not live:
        await message.reply_text(texts.NOTHING_TO_CANCEL)
        return
    try:
        status = await client.cancel(live[0].id, requester)
    except Conflict:
        status = JobStatus.succeeded
    if status is JobStatus.succeeded:
        await message.reply_text("That job had just finished; nothing to cancel.")
        return
    await message.reply_text(texts.cancel_asked(status))


async def link(update: Update, context: Context) -> None:
    """Make a link code, or redeem one: /link CODE."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    if not is_private(update.effective_chat):
        # A code seen by others could be redeemed by them, joining them to this account.
        await message.reply_text(texts.PRIVATE_ONLY.format(command="/link"))
        return
    svc = services(context)
    requester = plain_requester(user.id)
    try:
        if context.args:
            await svc.client.redeem_link_code(requester, "".join(context.args))
            await message.reply_text(texts.linked_text())
        else:
            code = await svc.client.create_link_code(requester)
            await message.reply_text(
                texts.link_code_text(code.code, svc.settings.link_code_ttl_s // 60)
            )
    except AtelierError as exc:
        await reply_error(update, context, exc)


async def styles(update: Update, context: Context) -> None:
    """Show the style picker to choose a default style."""
    user, message = update.effective_user, update.effective_message
    if user is None or message is None:
        return
    svc = services(context)
    prefs = await svc.prefs.user(user.id)
    markup = keyboards.styles(svc.styles, 0, str(user.id))
    await message.reply_text(texts.style_picker_text(prefs.style), reply_markup=markup)


async def settings(update: Update, context: Context) -> None:
    """Show personal defaults (private chat) or the group's settings (admins)."""
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if user is None or chat is None or message is None:
        return
    svc = services(context)
    if is_private(chat):
        prefs = await svc.prefs.user(user.id)
        markup = keyboards.settings(prefs, str(user.id), private=True)
        steps = svc.client.models.get().default_steps
        await message.reply_text(settings_text(prefs.model_dump(), steps), reply_markup=markup)
        return
    if not await is_admin(context, chat.id, user.id):
        await message.reply_text(
            texts.ADMINS_ONLY + " Your personal defaults are in /settings in a private chat."
        )
        return
    group = await svc.prefs.group(chat.id)
    await message.reply_text(
        group_settings_text(group.model_dump()), reply_markup=keyboards.group_settings(group)
    )


def settings_text(prefs: dict[str, object], model_steps: int) -> str:
    own = prefs["steps"]
    steps = texts.steps_setting(own if isinstance(own, int) else None, model_steps)
    return (
        f"Your defaults: aspect {prefs['aspect']}, size {str(prefs['size']).upper()}, "
        f"steps {steps}, raw {_on(prefs['raw'])}, PNG files {_on(prefs['original'])}, "
        f"NSFW {_on(prefs['nsfw'])}. Tap to change; flags in a prompt still win."
    )


def group_settings_text(prefs: dict[str, object]) -> str:
    who = "anyone" if prefs["anyone_can_press"] else "only the person who asked"
    return (
        f"Group settings: NSFW {_on(prefs['nsfw'])}; result buttons usable by {who}. "
        "Admins can tap to change."
    )


def _on(value: object) -> str:
    return "on" if value else "off"


async def unknown(update: Update, context: Context) -> None:
    """Answer a command the bot does not have."""
    if update.effective_message is not None:
        await update.effective_message.reply_text("I do not know that command; see /help.")
