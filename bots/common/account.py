"""Account use-cases for every platform: welcome, credits, the signed gallery link, history,
cancel, link codes, the style picker and settings views. Each returns what to say (``Say``);
the adapter posts it as a reply."""

from __future__ import annotations

from datetime import UTC, datetime

from bots.common import keyboards, texts
from bots.common.core import ChatCore
from bots.common.port import Say, Who
from bots.common.prefs import GroupPrefs, UserPrefs
from cluster.registry import ModelSpec
from core.errors import Conflict
from core.jobs import JobStatus
from core.signing import duration_text, gallery_url


async def welcome(core: ChatCore, who: Who, help_: str) -> Say:
    """Credits and how to start (``help_``: the platform's /help text)."""
    balance = await core.client.accounts.balance(core.plain_requester(who.user_id))
    return Say(texts.welcome(who.name or who.user_id, balance, datetime.now(UTC), help_))


async def credits(core: ChatCore, who: Who) -> Say:
    """Daily credits left, packs with their expiry and the next reset."""
    balance = await core.client.accounts.balance(core.plain_requester(who.user_id))
    return Say(texts.credits_text(balance, datetime.now(UTC)))


async def gallery_link_text(core: ChatCore, user_id: str) -> str:
    """A signed, expiring link to the person's gallery (of their account, so linked identities
    share it)."""
    owner = await core.client.accounts.account(core.plain_requester(user_id))
    url = gallery_url(core.settings, owner.id, now=datetime.now(UTC))
    return texts.gallery_text(url, duration_text(core.settings.gallery_link_ttl_s))


async def gallery(core: ChatCore, who: Who) -> Say | None:
    """The link in a private chat; in a group it goes privately (None: nothing to say there)."""
    text = await gallery_link_text(core, who.user_id)
    if who.private:
        return Say(text)
    if await core.port.send_private(who.user_id, text):
        return None
    return Say(texts.PRIVATE_ONLY.format(command="/gallery"))


async def apikey(core: ChatCore, who: Who) -> Say | None:
    """A new API key, shown once (only its hash is stored). Only ever posted privately: in a
    group it goes in a private message (None: nothing to say there)."""
    made = await core.client.accounts.create_api_key(core.plain_requester(who.user_id))
    text = texts.apikey_text(made.key, core.settings.public_base_url)
    if who.private:
        return Say(text)
    if await core.port.send_private(who.user_id, text):
        return None
    return Say(texts.PRIVATE_ONLY.format(command="/apikey"))


async def history(core: ChatCore, who: Who) -> Say:
    """The last 5 jobs with buttons to run them again."""
    jobs = await core.client.accounts.history(core.plain_requester(who.user_id), limit=5)
    return Say(texts.history_text(jobs), keyboards.history(jobs, who.user_id))


async def cancel_latest(core: ChatCore, who: Who) -> Say:
    """Cancel the person's latest queued or running job."""
    requester = core.plain_requester(who.user_id)
    jobs = await core.client.accounts.history(requester, limit=20)
    live = [j for j in jobs if not j.status.finished]
    if not live:
        return Say(texts.NOTHING_TO_CANCEL)
    try:
        status = await core.client.jobs.cancel(live[0].id, requester)
    except Conflict:
        status = JobStatus.succeeded
    if status is JobStatus.succeeded:
        return Say("That job had just finished; nothing to cancel.")
    return Say(texts.cancel_asked(status))


async def link(core: ChatCore, who: Who, code: str) -> Say:
    """Make a link code (no ``code``), or redeem one. Raises AtelierError for a bad code."""
    if not who.private:
        # A code seen by others could be redeemed by them, joining them to this account.
        return Say(texts.PRIVATE_ONLY.format(command="/link"))
    requester = core.plain_requester(who.user_id)
    if code:
        await core.client.accounts.redeem_link_code(requester, code)
        return Say(texts.linked_text())
    made = await core.client.accounts.create_link_code(requester)
    return Say(texts.link_code_text(made.code, core.settings.link_code_ttl_s // 60))


async def styles(core: ChatCore, who: Who) -> Say:
    """The style picker, to choose a default style."""
    prefs = await core.prefs.user(who.user_id)
    return Say(texts.style_picker_text(prefs.style), keyboards.styles(core.styles, 0, who.user_id))


async def settings(core: ChatCore, who: Who) -> Say:
    """Personal defaults (private chat) or the group's settings (admins only)."""
    if who.private:
        prefs = await core.prefs.user(who.user_id)
        return settings_view(prefs, who.user_id, private=True, model=core.client.models.get())
    if not await core.port.is_admin(who.chat_id, who.user_id, via=who.via):
        return Say(
            texts.ADMINS_ONLY + " Your personal defaults are in /settings in a private chat."
        )
    return group_settings_view(await core.prefs.group(who.chat_id))


def settings_view(prefs: UserPrefs, owner: str, *, private: bool, model: ModelSpec) -> Say:
    """The person's defaults with the real values a plain /imagine uses (the default model's
    where the person set none)."""
    steps = texts.steps_setting(prefs.steps, model.default_steps)
    size = (
        prefs.size.upper() if prefs.size is not None
        else f"{model.default_width}x{model.default_height} (model default)"
    )
    text = (
        f"Your defaults: aspect {prefs.aspect}, size {size}, "
        f"steps {steps}, raw {_on(prefs.raw)}, PNG files {_on(prefs.original)}, "
        f"NSFW {_on(prefs.nsfw)}. Tap to change; flags in a prompt still win."
    )
    return Say(text, keyboards.settings(prefs, owner, private=private))


def group_settings_view(prefs: GroupPrefs) -> Say:
    who = "anyone" if prefs.anyone_can_press else "only the person who asked"
    text = (
        f"Group settings: NSFW {_on(prefs.nsfw)}; result buttons usable by {who}. "
        "Admins can tap to change."
    )
    return Say(text, keyboards.group_settings(prefs))


def _on(value: object) -> str:
    return "on" if value else "off"
