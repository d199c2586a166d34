"""The account commands on Discord, answered to the asker only: /credits, /gallery, /history
(with its reroll buttons), /styles (a default style), /cancel; /settings: personal defaults in
a DM, the server's NSFW and buttons settings for its admins in a server."""

from __future__ import annotations

from typing import Any

from bots.common import texts
from bots.common.buttons import Action, parse
from bots.discord import guilds
from testing.discord import payloads as p
from testing.discord.server import Call, Interaction
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, BOB, TINY, imagine, result_of


async def ask(stack: DiscordStack, user: int, command: str, *, channel: int = p.PLAIN_CHANNEL,
              **options: Any) -> tuple[Interaction, Call]:
    """Run a command; returns it and the answer (its deferred response, edited)."""
    fake = stack.fake
    opts = [p.option(k, v) for k, v in options.items()]
    inter = await fake.slash(user, command, opts, channel=channel)
    answer = await fake.wait_for(
        lambda: next((c for c in fake.calls_to("PATCH /webhooks/") if inter.token in c.path),
                     None),
        30,
        f"the answer to /{command}",
    )
    assert inter.callback is not None and inter.callback.json["data"]["flags"] & 64
    return inter, answer


def button(call: Call, action: Action, arg: str | None = None) -> str:
    for cid in call.custom_ids():
        b = parse(cid.removeprefix("at:"))
        if b.action is action and (arg is None or b.arg == arg):
            return cid
    raise AssertionError(f"no {action.name} button in {call.custom_ids()}")


async def test_credits_gallery_and_cancel_with_nothing_to_cancel(
    discord_stack: DiscordStack,
) -> None:
    _, credits = await ask(discord_stack, ALICE, "credits")
    assert "10" in credits.json["content"]  # the free tier's daily allowance
    _, gallery = await ask(discord_stack, ALICE, "gallery")
    assert "https://atelier.example/g/" in gallery.json["content"]
    _, cancel = await ask(discord_stack, ALICE, "cancel")
    assert cancel.json["content"] == texts.NOTHING_TO_CANCEL


async def test_history_runs_a_job_again(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    await imagine(discord_stack, prompt=f"a windmill {TINY}")
    await discord_stack.finished(1)
    _, history = await ask(discord_stack, ALICE, "history")
    assert "windmill" in history.json["content"]
    again = await fake.click(ALICE, history.result, button(history, Action.reroll))
    await result_of(discord_stack, again)
    jobs = await discord_stack.finished(2)
    assert discord_stack.request_of(jobs[1]).prompt == discord_stack.request_of(jobs[0]).prompt


async def test_styles_sets_a_default_style(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    _, picker = await ask(discord_stack, ALICE, "styles")
    chosen = await fake.click(ALICE, picker.result, button(picker, Action.set_style, "anime"))
    await fake.wait_for(lambda: chosen.callback, 30, "the press")
    prefs = await discord_stack.discord.core.prefs.user(ALICE)
    assert prefs.style == "anime"
    await imagine(discord_stack, prompt=f"a fox {TINY}")
    (job,) = await discord_stack.finished(1)
    assert discord_stack.request_of(job).styles == ("anime",)


async def test_settings_in_a_dm_are_personal(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    _, panel = await ask(discord_stack, ALICE, "settings", channel=p.DM)
    assert "Your defaults" in panel.json["content"]
    press = await fake.click(ALICE, panel.result, button(panel, Action.setting, "raw=1"))
    await fake.wait_for(lambda: press.callback, 30, "the press")
    await fake.wait_for(
        lambda: any(press.token in c.path for c in fake.calls_to("PATCH /webhooks/")),
        30,
        "the panel updated",
    )
    assert (await discord_stack.discord.core.prefs.user(ALICE)).raw


async def test_server_settings_in_a_server_are_for_its_admins(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    _, refused = await ask(discord_stack, BOB, "settings")
    assert texts.ADMINS_ONLY in refused.json["content"]

    fake.guild.admins.add(ALICE)
    _, panel = await ask(discord_stack, ALICE, "settings")
    toggle = button(panel, Action.group_setting, "nsfw=1")
    not_admin = await fake.click(BOB, panel.result, toggle)
    await fake.wait_for(
        lambda: any(not_admin.token in c.path and texts.ADMINS_ONLY in (c.json or {}).get(
            "content", "") for c in fake.calls_to("POST /webhooks/")),
        30,
        "the refusal",
    )
    assert not (await guilds.load(discord_stack.state, p.GUILD_ID)).nsfw

    capped = await fake.slash(ALICE, "server-settings", [p.option("steps_cap", 30)])
    await fake.wait_for(lambda: capped.callback, 30, "the cap set")  # the toggle keeps it
    admin = await fake.click(ALICE, panel.result, toggle)
    await fake.wait_for(lambda: admin.callback, 30, "the press")
    await fake.wait_for(
        lambda: any(admin.token in c.path for c in fake.calls_to("POST /webhooks/")),
        30,
        "the answer",
    )
    prefs = await guilds.load(discord_stack.state, p.GUILD_ID)
    assert prefs.nsfw and prefs.steps_cap == 30
    # Allowed by the admins: an NSFW prompt now works in a plain channel of this server.
    await imagine(discord_stack, BOB, prompt=f"a nude statue in a museum {TINY}")
    (job,) = await discord_stack.finished(1)
    assert discord_stack.request_of(job).steps == 2
