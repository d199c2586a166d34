"""Every inline button: reroll, V1, U1, another style, gallery, cancel, the /styles picker,
/settings, /history re-runs and group settings; someone else's press is politely refused."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bots.common.requests import parse_prompt
from core.jobs import Requester
from core.request import JobKind
from core.signing import verify
from testing.telegram import BOT_USERNAME, Call
from tests.bots.conftest import TINY, Stack


def data_of(call: Call, label: str) -> str:
    """The callback data of the button whose label contains ``label``."""
    for b in call.buttons():
        if label in b["text"]:
            return str(b["callback_data"])
    raise AssertionError(f"no {label!r} button in {[b['text'] for b in call.buttons()]}")


async def press(stack: Stack, user: int, call: Call, label: str) -> Call:
    """Press a button on the message ``call`` created; returns the bot's answer."""
    message: dict[str, Any] = call.result
    query = await stack.fake.press(user, message, data_of(call, label))
    return await stack.fake.answer(query)


async def test_result_buttons_each_make_the_right_job(stack: Stack) -> None:
    fake, user, other = stack.fake, 2001, 2002
    await fake.send(user, f"/imagine a red boat {TINY} --seed 5")
    photo = await fake.wait_call("sendPhoto", chat=user)
    (first,) = await stack.finished(1)

    refused = await press(stack, other, photo, "Reroll")
    assert "belong to the person who asked" in refused.params["text"]
    assert len(stack.jobs()) == 1

    # One at a time: the free tier runs two jobs at once.
    answer = await press(stack, user, photo, "Reroll")
    assert answer.params["text"].startswith("Rerolling")
    await stack.finished(2)
    await press(stack, user, photo, "V1")
    await stack.finished(3)
    await press(stack, user, photo, "U1")
    jobs = await stack.finished(4)
    reroll, variation, upscale = (stack.request_of(j) for j in jobs[1:])
    assert reroll.prompt == "a red boat" and reroll.seed != 5
    assert variation.kind is JobKind.variation and variation.init_image is not None
    assert upscale.kind is JobKind.upscale and (upscale.width, upscale.height) == (128, 128)
    await fake.wait_call("sendPhoto", chat=user, n=4)

    await press(stack, user, photo, "Style")
    picker = await fake.wait_for(
        lambda: next(
            (
                c
                for c in fake.calls_of("sendMessage", chat=user)
                if "Pick a style" in c.params["text"]
            ),
            None,
        ),
        what="the style picker",
    )
    await press(stack, user, picker, "▶")
    await fake.wait_call("editMessageReplyMarkup", chat=user)
    await press(stack, user, picker, "Anime")
    jobs = await stack.finished(5)
    restyled = stack.request_of(jobs[-1])
    assert restyled.styles == ("anime",) and restyled.seed == stack.request_of(first).seed

    await press(stack, user, photo, "Gallery")
    link = await fake.wait_for(
        lambda: next(
            (c for c in fake.calls_of("sendMessage", chat=user) if "/g/" in c.params["text"]), None
        ),
        what="the gallery link",
    )
    url = link.params["text"].split()[-1]
    assert url.startswith("https://atelier.example/g/")
    subject = verify(
        stack.settings.resolved_signing_key,
        url.rsplit("/", 1)[1],
        purpose="gallery",
        now=datetime.now(UTC),
    )
    assert subject == str(first.account_id)


async def test_cancel_button_refunds_a_queued_job(stack: Stack) -> None:
    fake, user = stack.fake, 2003
    full = await stack.balance(user)
    await stack.stop_dispatcher()
    await fake.send(user, f"/imagine a slow snail {TINY}")
    status = await fake.wait_for(
        lambda: next(
            (
                c
                for c in fake.calls_of("editMessageText", chat=user)
                if "Cancel" in str(c.params.get("reply_markup"))
            ),
            None,
        ),
        what="a status message with a cancel button",
    )
    answer = await press(stack, user, status, "Cancel")
    assert "Cancelled" in answer.params["text"]
    (job,) = await stack.finished(1)
    assert job.status.value == "cancelled"
    assert await stack.balance(user) == full
    await fake.wait_for(
        lambda: any(
            "refunded" in c.params["text"] for c in fake.calls_of("editMessageText", chat=user)
        ),
        what="the status message saying cancelled",
    )
    await stack.start_dispatcher()
    await fake.send(user, "/cancel")
    reply = await fake.wait_call("sendMessage", chat=user, n=2)
    assert "no queued or running job" in reply.params["text"]
    assert not fake.calls_of("sendPhoto", chat=user)


async def test_styles_and_settings_become_the_defaults(stack: Stack) -> None:
    fake, user = stack.fake, 2004
    await fake.send(user, "/styles")
    picker = await fake.wait_call("sendMessage", chat=user)
    await press(stack, user, picker, "Watercolor")
    await fake.send(user, "/settings")
    settings = await fake.wait_call("sendMessage", chat=user, n=2)
    # No steps of one's own: the default model's, said so (tiny: 4).
    assert "steps 4 (model default)" in settings.params["text"]
    await press(stack, user, settings, "Raw")
    await press(stack, user, settings, "16:9")
    await fake.wait_call("editMessageText", chat=user, n=3)

    prefs = await stack.app.bot_data["atelier"].prefs.user(user)
    assert (prefs.style, prefs.raw, prefs.aspect) == ("watercolor", True, "16:9")
    wide = parse_prompt("a tall tower", prefs).request
    assert wide.width > wide.height and wide.raw and wide.styles == ("watercolor",)

    await fake.send(user, f"/imagine a tall tower {TINY}")
    (job,) = await stack.finished(1)
    request = stack.request_of(job)
    assert request.styles == ("watercolor",) and request.raw


async def test_history_buttons_run_a_job_again(stack: Stack) -> None:
    fake, user = stack.fake, 2005
    await fake.send(user, f"/imagine a green hill {TINY}")
    await stack.finished(1)
    await fake.send(user, "/history")
    history = await fake.wait_for(
        lambda: next(
            (
                c
                for c in fake.calls_of("sendMessage", chat=user)
                if "Your last jobs" in c.params["text"]
            ),
            None,
        ),
        what="the history",
    )
    assert "a green hill" in history.params["text"]
    await press(stack, user, history, "🔄 1")
    jobs = await stack.finished(2)
    assert stack.request_of(jobs[1]).prompt == "a green hill"


async def test_group_admins_set_nsfw_and_buttons_stay_the_owners(stack: Stack) -> None:
    fake, group, admin, member = stack.fake, -5001, 2010, 2011
    fake.admins[group] = {admin}
    await fake.send(member, f"/settings@{BOT_USERNAME}", chat=group)
    refused = await fake.wait_call("sendMessage", chat=group)
    assert "Only the group's admins" in refused.params["text"]

    # Not allowed in this group yet: one clear line, no job, no charge.
    full = await stack.balance(member)
    await fake.send(member, f"/imagine@{BOT_USERNAME} a nude statue in a museum {TINY}", chat=group)
    blocked = await fake.wait_call("sendMessage", chat=group, n=2)
    assert blocked.params["text"].startswith("⚠️") and "not allowed here" in blocked.params["text"]
    assert "nothing was charged" in blocked.params["text"]
    assert not stack.jobs() and await stack.balance(member) == full

    await fake.send(admin, f"/settings@{BOT_USERNAME}", chat=group)
    panel = await fake.wait_call("sendMessage", chat=group, n=3)
    not_admin = await press(stack, member, panel, "NSFW")
    assert "Only the group's admins" in not_admin.params["text"]
    await press(stack, admin, panel, "NSFW")
    await fake.wait_call("editMessageText", chat=group)

    await fake.send(member, f"/imagine@{BOT_USERNAME} a nude statue in a museum {TINY}", chat=group)
    photo = await fake.wait_call("sendPhoto", chat=group)
    (job,) = await stack.finished(1)
    assert '"atelier_nsfw":"1"' in job.delivery_json.replace(" ", "")
    refused_press = await press(stack, admin, photo, "Reroll")
    assert "belong to the person who asked" in refused_press.params["text"]
    await fake.send(member, "a group chat message that is no prompt", chat=group)
    await fake.send(member, f"/imagine@some_other_bot a cat {TINY}", chat=group)
    await fake.send(member, f"/gallery@{BOT_USERNAME}", chat=group)
    await fake.wait_call("sendMessage", chat=member)  # the link goes to a private chat
    assert len(stack.jobs()) == 1

    # The admins let anyone use result buttons: the admin's reroll runs, on the admin's credits.
    await press(stack, admin, panel, "Anyone may press")
    accepted = await press(stack, admin, photo, "Reroll")
    assert accepted.params["text"].startswith("Rerolling")
    first, rerolled = await stack.finished(2)
    admin_account = await stack.client.account(
        Requester(platform="telegram", platform_user_id=str(admin))
    )
    assert rerolled.account_id == admin_account.id != first.account_id
    assert stack.request_of(rerolled).prompt == stack.request_of(first).prompt


async def test_every_picker_and_settings_button(stack: Stack) -> None:
    fake, user = stack.fake, 2006
    await fake.send(user, "/styles")
    picker = await fake.wait_call("sendMessage", chat=user)
    await press(stack, user, picker, "▶")
    page2 = await fake.wait_call("editMessageReplyMarkup", chat=user)
    nav = {"◀", "▶", "No style"}
    first_styles = {b["text"] for b in picker.buttons()} - nav
    assert first_styles and first_styles.isdisjoint(b["text"] for b in page2.buttons())
    await press(stack, user, page2, "◀")
    page1 = await fake.wait_call("editMessageReplyMarkup", chat=user, n=2)
    assert [b["text"] for b in page1.buttons()] == [b["text"] for b in picker.buttons()]
    svc = stack.app.bot_data["atelier"]
    await press(stack, user, picker, "Watercolor")
    assert (await svc.prefs.user(user)).style == "watercolor"
    cleared = await press(stack, user, picker, "No style")
    assert cleared.params["text"] == "Default style cleared."
    assert (await svc.prefs.user(user)).style is None

    await fake.send(user, "/settings")
    settings = await fake.wait_call("sendMessage", chat=user, n=2)
    for label in ("M 768", "30 steps", "PNG files", "NSFW", "9:16"):
        assert (await press(stack, user, settings, label)).params["text"] == "Saved."
    prefs = await svc.prefs.user(user)
    assert (prefs.size, prefs.steps, prefs.original, prefs.nsfw, prefs.aspect) == (
        "m",
        30,
        True,
        True,
        "9:16",
    )
    panel = fake.calls_of("editMessageText", chat=user)[-1]
    assert "NSFW on" in panel.params["text"] and "steps 30" in panel.params["text"]
    # Private NSFW allowance: a prompt refused by default is now taken (PNG files as set).
    await fake.send(user, f"/imagine a nude figure study {TINY}")
    await fake.wait_call("sendDocument", chat=user)
    (job,) = await stack.finished(1)
    assert '"atelier_nsfw":"1"' in job.delivery_json.replace(" ", "")
