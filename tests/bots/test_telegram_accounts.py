"""Account commands: /start, /help, /credits, /gallery, /link across two identities (one balance,
one gallery), and the error handler: one useful line for the person, the log for the operator,
never the token."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

import pytest
from telegram.ext import CommandHandler

from bots.telegram.menu import OPERATOR_COMMANDS
from core.jobs import Requester
from storage import ledger
from tests.bots.conftest import TINY, TOKEN, Stack, _Errors


def texts_to(stack: Stack, chat: int) -> list[str]:
    return [c.params["text"] for c in stack.fake.calls_of("sendMessage", chat=chat)]


async def test_start_help_credits_and_gallery(stack: Stack) -> None:
    fake, user = stack.fake, 3001
    for command in ("/start", "/help", "/credits", "/gallery", "/nonsense"):
        await fake.send(user, command)
    await fake.wait_call("sendMessage", chat=user, n=5)
    replies = texts_to(stack, user)  # updates are handled concurrently: any order

    def reply(marker: str) -> str:
        return next(t for t in replies if marker in t)

    start = reply("Hi user3001")
    assert "10 left today" in start and "/imagine" in start
    # /help's own reply (the welcome repeats the help text, so match on how it starts).
    help_reply = next(t for t in replies if t.startswith("How to use me"))
    assert "--png" in help_reply
    # Only the models a job can use now (the tiny ones; the hub models are offline here).
    assert "Models (--model): demo, tiny, tiny-xl." in help_reply
    assert "Next reset:" in reply("10 of 10 daily credits left")
    assert reply("Your gallery").split()[-1].startswith("https://atelier.example/g/")
    assert "/help" in reply("I do not know that command")
    commands = fake.calls_of("setMyCommands")[0].json("commands")
    assert {"imagine", "styles", "link", "settings"} <= {c["command"] for c in commands}


async def test_help_lists_every_command_of_the_menu(stack: Stack) -> None:
    """/help, the menu (setMyCommands) and the command handlers name the same commands."""
    fake, user = stack.fake, 3009
    await fake.send(user, "/help")
    text = (await fake.wait_call("sendMessage", chat=user)).params["text"]
    listed = re.findall(r"^/(\w+)", text, re.MULTILINE)
    menu = [c["command"] for c in fake.calls_of("setMyCommands")[0].json("commands")]
    assert stack.app is not None
    handled = {
        name
        for handler in stack.app.handlers[0]
        if isinstance(handler, CommandHandler)
        for name in handler.commands
    }
    assert sorted(listed) == sorted(menu)  # /apikey and /help included
    # /start: Telegram's own; /refund: for operators; both kept off the menu.
    assert handled - {"start", *OPERATOR_COMMANDS} == set(menu)


async def test_credits_lists_packs_with_their_expiry(stack: Stack) -> None:
    fake, user = stack.fake, 3005
    account = await stack.client.account(Requester(platform="telegram", platform_user_id="3005"))
    expires = datetime.now(UTC) + timedelta(days=30)
    with stack.sessions.begin() as session:
        ledger.grant(
            session=session, account_id=account.id, amount=25, key="pay-3005", expires_at=expires
        )
    await fake.send(user, "/credits")
    reply = (await fake.wait_call("sendMessage", chat=user)).params["text"]
    assert "10 of 10 daily credits left" in reply
    assert f"25 credits, expires {expires:%Y-%m-%d}" in reply
    assert "Total you can spend now: 35." in reply
    assert "Next reset:" in reply


async def test_link_joins_two_identities_into_one_balance_and_gallery(stack: Stack) -> None:
    fake, first, second = stack.fake, 3002, 3003
    await fake.send(first, f"/imagine a first picture {TINY}")
    await fake.send(second, f"/imagine a second picture {TINY}")
    await stack.finished(2)

    await fake.send(first, "/link")
    made = await fake.wait_for(
        lambda: next((t for t in texts_to(stack, first) if "link code" in t), None),
        what="a link code",
    )
    code = made.split("link code: ")[1].split()[0]
    await fake.send(second, f"/link {code.lower()}")
    await fake.wait_for(
        lambda: any("Linked" in t for t in texts_to(stack, second)), what="the link confirmed"
    )

    assert await stack.balance(first) == await stack.balance(second)
    accounts = {image.account_id for image in stack.images()}
    assert len(accounts) == 1 and len(stack.images()) == 2

    await fake.send(second, f"/link {code}")  # a code works once
    await fake.wait_for(
        lambda: any("already used" in t for t in texts_to(stack, second)), what="a refusal"
    )
    await fake.send(first, "/link", chat=-7001)  # never in a group: others could redeem it
    await fake.wait_call("sendMessage", chat=-7001)
    assert "private chat" in texts_to(stack, -7001)[0]


async def test_an_unexpected_failure_gets_one_line_and_a_log_without_the_token(
    stack: Stack, error_logs: _Errors, caplog: pytest.LogCaptureFixture
) -> None:
    fake, user = stack.fake, 3004
    # A real fault under the bot: the jobs table is gone (the dispatcher, which reads it, is
    # stopped first so that only the bot meets it).
    await stack.stop_dispatcher()
    with stack.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs RENAME TO jobs_gone")
    caplog.set_level(logging.DEBUG)
    await fake.send(user, "/history")
    reply = await fake.wait_call("sendMessage", chat=user)
    assert (
        reply.params["text"] == "Something went wrong on our side; it has been logged. "
        "Please try again in a minute."
    )
    await fake.wait_for(lambda: error_logs.records, what="the error in the log")
    (record,) = error_logs.records
    assert record.name == "bots.telegram" and record.exc_info is not None
    error_logs.records.clear()  # expected here
    logged = "\n".join(caplog.handler.format(r) for r in caplog.records)
    assert "no such table: jobs" in logged  # the operator sees the cause
    assert TOKEN not in logged
