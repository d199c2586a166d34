"""An account an operator blocked (`atelier account block`): the bot refuses its new jobs
with the reason and charges nothing, Stars pre-checkout refuses its payments with the reason,
and linking it to a fresh account carries the block over. Unblocked, it works again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.errors import AccountBlocked
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from storage import accounts
from testing.telegram import FakeTelegram
from tests.bots.conftest import TINY, Stack, settings_for
from tests.bots.test_telegram_buy import SHOP, _invoices

USER = 6001


@pytest.fixture
async def blocked_stack(
    tmp_path: Path, redis_url: str, fake: FakeTelegram, tiny_dir: Path
) -> AsyncIterator[Stack]:
    """The bot with the shop, and no dispatcher: the tiny model's files are here, so submit
    gets as far as the account before anything could run."""
    settings = settings_for(tmp_path, redis_url, fake)
    (settings.data_dir / "shop.toml").write_text(SHOP)
    s = Stack(settings, fake, None, tiny_dir)
    await fake.start()
    await s.start_bot()
    try:
        yield s
    finally:
        await s.close()


def _block(stack: Stack, user: int, reason: str) -> None:
    with stack.sessions.begin() as s:
        acc = accounts.find_account(session=s, platform="telegram", platform_user_id=str(user))
        accounts.block(session=s, account_id=acc.id, reason=reason)


def _unblock(stack: Stack, user: int) -> None:
    with stack.sessions.begin() as s:
        acc = accounts.find_account(session=s, platform="telegram", platform_user_id=str(user))
        accounts.unblock(session=s, account_id=acc.id)


async def test_a_blocked_account_is_refused_at_admission_and_charged_nothing(
    blocked_stack: Stack,
) -> None:
    stack, fake = blocked_stack, blocked_stack.fake
    before = await stack.balance(USER)  # the account exists now
    _block(stack, USER, "abuse reports")
    await fake.send(USER, f"/imagine a red fox {TINY}")
    reply = (await fake.wait_call("sendMessage", chat=USER)).params["text"]
    assert "blocked (abuse reports)" in reply and "nothing was charged" in reply, reply
    assert stack.jobs() == [] and await stack.balance(USER) == before
    # The client itself (every front end and the APIs go through it) refuses it the same way.
    who = Requester(platform="telegram", platform_user_id=str(USER))
    with pytest.raises(AccountBlocked, match="abuse reports"):
        await stack.client.submit(
            GenerationRequest(prompt="a fox", width=64, height=64, steps=2), who,
            DeliveryTarget(frontend="test", chat_id="1"), "blocked-key",
        )
    assert stack.jobs() == [] and await stack.balance(USER) == before


async def test_pre_checkout_refuses_a_blocked_account_with_the_reason(
    blocked_stack: Stack,
) -> None:
    stack, fake = blocked_stack, blocked_stack.fake
    small = (await _invoices(fake, USER))["100 credits"]
    await stack.balance(USER)  # the account exists (it has used the bot)
    _block(stack, USER, "chargebacks")
    refused = await fake.pre_checkout(USER, small)
    assert refused.params["ok"] in (False, "false", "False")
    assert "blocked (chargebacks)" in refused.params["error_message"]
    _unblock(stack, USER)
    allowed = await fake.pre_checkout(USER, small)
    assert allowed.params["ok"] in (True, "true", "True")


async def test_linking_a_blocked_account_carries_the_block(blocked_stack: Stack) -> None:
    stack = blocked_stack
    blocked = Requester(platform="telegram", platform_user_id=str(USER))
    fresh = Requester(platform="discord", platform_user_id="66001")
    await stack.client.account(blocked)
    code = await stack.client.create_link_code(fresh)
    _block(stack, USER, "ban evasion")
    joined = await stack.client.redeem_link_code(blocked, code.code)
    assert joined.blocked and joined.blocked_reason == "ban evasion"
