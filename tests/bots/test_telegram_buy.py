"""Buying with Telegram Stars against the fake Bot API: /buy sends invoices, pre-checkout is
answered (a withdrawn pack refused), a payment credits once, /refund takes back what is left,
a subscription sets the tier and lapses. No dispatcher: nothing here makes images."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bots.telegram.handlers.buy import PURCHASES
from cluster.purchases import PurchaseService
from core.jobs import Requester
from core.shop import Shop, parse_shop
from storage import ledger
from storage.models import PurchaseStatus
from testing.telegram import Call, FakeTelegram
from tests.bots.conftest import Stack, settings_for

OPERATOR = 4242
SHOP = """
[packs.small]
title = "100 credits"
credits = 100
lifetime_days = 90
stars = 50

[packs.large]
title = "500 credits"
credits = 500
stars = 200

[subscription]
title = "Supporter"
tier = "supporter"
stars = 150
"""


@pytest.fixture
async def shop_stack(
    tmp_path: Path, redis_url: str, fake: FakeTelegram
) -> AsyncIterator[Stack]:
    settings = settings_for(tmp_path, redis_url, fake, operators=[f"telegram:{OPERATOR}"])
    (settings.data_dir / "shop.toml").write_text(SHOP)
    s = Stack(settings, fake, None, settings.data_dir)
    await fake.start()
    await s.start_bot()
    try:
        yield s
    finally:
        await s.close()


def _service(stack: Stack) -> PurchaseService:
    assert stack.app is not None
    service: PurchaseService = stack.app.bot_data[PURCHASES]
    return service


def _requester(user: int) -> Requester:
    return Requester(platform="telegram", platform_user_id=str(user))


async def _invoices(fake: FakeTelegram, user: int) -> dict[str, Call]:
    await fake.send(user, "/buy")
    await fake.wait_call("sendInvoice", chat=user, n=2)
    await fake.wait_call("sendMessage", chat=user, n=2)  # the offers, then the link
    return {c.params["title"]: c for c in fake.calls_of("sendInvoice", chat=user)}


async def _pay(fake: FakeTelegram, user: int, invoice: Call, charge: str, n: int) -> str:
    await fake.push(fake.payment(user, invoice, charge))
    return str((await fake.wait_call("sendMessage", chat=user, n=n)).params["text"])


async def test_buy_sends_a_stars_invoice_per_pack_and_a_subscription_link(
    shop_stack: Stack,
) -> None:
    fake, user = shop_stack.fake, 5001
    invoices = await _invoices(fake, user)
    assert set(invoices) == {"100 credits", "500 credits"}
    small = invoices["100 credits"]
    assert small.params["currency"] == "XTR"
    assert small.params.get("provider_token", "") == ""
    assert small.json("prices") == [{"label": "100 credits", "amount": 50}]
    assert small.params["payload"] == "pack:small:100:90"
    link = await fake.wait_call("createInvoiceLink")
    assert int(link.params["subscription_period"]) == 2592000
    texts = [c.params["text"] for c in fake.calls_of("sendMessage", chat=user)]
    assert "Credit packs:" in texts[0] and "200 ⭐" in texts[0]
    await fake.wait_call("sendMessage", chat=user, n=2)
    assert "Subscribe (150 ⭐ a month): https://t.me/" in fake.calls_of(
        "sendMessage", chat=user
    )[1].params["text"]


async def test_payment_credits_once_even_when_delivered_twice(shop_stack: Stack) -> None:
    fake, user = shop_stack.fake, 5002
    invoices = await _invoices(fake, user)
    small = invoices["100 credits"]
    answer = await fake.pre_checkout(user, small)
    assert answer.params["ok"] in (True, "true", "True")
    before = await shop_stack.balance(user)
    sent = len(fake.calls_of("sendMessage", chat=user))
    text = await _pay(fake, user, small, "charge-a", sent + 1)
    assert "100 credits added" in text and f"Credits now: {before + 100}." in text
    # The same payment delivered again (a replayed update): credited once.
    again = await _pay(fake, user, small, "charge-a", sent + 2)
    assert "already credited" in again
    assert await shop_stack.balance(user) == before + 100
    summary = await _service(shop_stack).summary(_requester(user))
    assert [(p.key, p.credits) for p in summary.purchases] == [("telegram:charge-a", 100)]
    with shop_stack.sessions() as s:
        audit = ledger.audit(session=s, account_id=summary.account_id)
    assert audit.balanced and audit.conserved and audit.granted == before + 100


async def test_pre_checkout_refuses_a_withdrawn_pack_or_a_changed_price(
    shop_stack: Stack,
) -> None:
    fake, user = shop_stack.fake, 5003
    invoices = await _invoices(fake, user)
    large = invoices["500 credits"]
    cheaper = await fake.pre_checkout(user, large, stars=1)
    assert cheaper.params["ok"] in (False, "false", "False")
    assert "price" in cheaper.params["error_message"]
    # The operator withdraws the pack after the invoice went out.
    service = _service(shop_stack)
    service.shop = Shop(packs={k: v for k, v in service.shop.packs.items() if k != "large"})
    refused = await fake.pre_checkout(user, large)
    assert refused.params["ok"] in (False, "false", "False")
    assert "no longer on sale" in refused.params["error_message"]


async def test_operator_refund_after_partial_spend(shop_stack: Stack) -> None:
    fake, user = shop_stack.fake, 5004
    small = (await _invoices(fake, user))["100 credits"]
    sent = len(fake.calls_of("sendMessage", chat=user))
    await _pay(fake, user, small, "charge-r", sent + 1)
    account = await shop_stack.client.account(_requester(user))
    allowance = shop_stack.settings.tiers["free"].daily_allowance
    with shop_stack.sessions.begin() as s:  # spend the day's allowance and 30 of the pack
        tiers = shop_stack.settings.tiers
        now = datetime.now(UTC)
        ledger.reserve(
            session=s, account_id=account.id, job_id="spend", amount=allowance + 30,
            now=now, tiers=tiers,
        )
        ledger.capture(session=s, job_id="spend", now=now)
    # Not an operator: refused, nothing refunded.
    await fake.send(user, "/refund charge-r")
    refused = await fake.wait_call("sendMessage", chat=user, n=sent + 2)
    assert "Only operators" in refused.params["text"]
    assert not fake.calls_of("refundStarPayment")
    await fake.send(OPERATOR, "/refund charge-r")
    reply = (await fake.wait_call("sendMessage", chat=OPERATOR)).params["text"]
    call = fake.calls_of("refundStarPayment")[0]
    assert (int(call.params["user_id"]), call.params["telegram_payment_charge_id"]) == (
        user, "charge-r"
    )
    assert "took back 70 of 100 credits; 30 already spent (owed)" in reply
    assert await shop_stack.balance(user) == 0
    bought = await _service(shop_stack).get("telegram:charge-r")
    assert (bought.status, bought.clawed_back, bought.owed) == (PurchaseStatus.refunded, 70, 30)
    # A second /refund: Telegram says it is refunded already; nothing more is taken.
    await fake.send(OPERATOR, "/refund charge-r")
    again = (await fake.wait_call("sendMessage", chat=OPERATOR, n=2)).params["text"]
    assert "took back 70 of 100" in again
    with shop_stack.sessions() as s:
        audit = ledger.audit(session=s, account_id=account.id)
    assert audit.balanced and audit.conserved and audit.refunded == 70


async def test_subscription_payment_sets_the_tier_until_it_lapses(shop_stack: Stack) -> None:
    fake, user = shop_stack.fake, 5005
    await fake.send(user, "/buy")
    link = await fake.wait_call("createInvoiceLink")
    assert link.params["payload"] == "sub"
    await fake.wait_call("sendMessage", chat=user, n=2)  # the offers, then the link
    end = datetime.now(UTC) + timedelta(days=30)
    payment = {
        "currency": "XTR",
        "total_amount": 150,
        "invoice_payload": "sub",
        "telegram_payment_charge_id": "sub-1",
        "provider_payment_charge_id": "",
        "subscription_expiration_date": int(end.timestamp()),
        "is_recurring": True,
        "is_first_recurring": True,
    }
    sent = len(fake.calls_of("sendMessage", chat=user))
    await fake.push(fake.message(user, successful_payment=payment))
    text = (await fake.wait_call("sendMessage", chat=user, n=sent + 1)).params["text"]
    assert "You are on tier supporter until" in text
    service = _service(shop_stack)
    summary = await service.summary(_requester(user))
    assert summary.tier == "supporter" and summary.tier_until is not None
    assert summary.balance.daily_allowance == shop_stack.settings.tiers["supporter"].daily_allowance
    # The period ends unpaid: back to the default tier.
    assert await service.lapse(end + timedelta(seconds=1)) == [summary.account_id]
    later = await service.summary(_requester(user), now=end + timedelta(seconds=2))
    assert later.tier == "free" and later.tier_until is None
    assert later.purchases[0].status == PurchaseStatus.ended


async def test_out_of_credits_reply_offers_the_packs(shop_stack: Stack) -> None:
    from bots.common.texts import error_line
    from core.errors import InsufficientCredits

    refusal = InsufficientCredits("this needs 4 credits; you have 0", needed=4, available=0)
    line = error_line(refusal)
    assert "/buy" in line


def test_shop_file_errors_name_the_problem(tmp_path: Path, fake: FakeTelegram) -> None:
    from core.errors import ConfigError

    settings = settings_for(tmp_path, None, fake)
    with pytest.raises(ConfigError, match="subscription tier 'gold' is not one of the tiers"):
        parse_shop({"subscription": {"title": "Gold", "tier": "gold"}}, settings)
    with pytest.raises(ConfigError, match="pack name 'Big Pack' must be"):
        parse_shop({"packs": {"Big Pack": {"credits": 5}}}, settings)
    with pytest.raises(ConfigError, match="Discord SKU id is used twice"):
        parse_shop(
            {"packs": {"a": {"credits": 1, "discord_sku": "9"}, "b": {"credits": 2,
                                                                       "discord_sku": "9"}}},
            settings,
        )


async def test_the_bot_drops_the_tier_of_a_subscription_that_lapsed(shop_stack: Stack) -> None:
    service, user = _service(shop_stack), 5006
    month_ago = datetime.now(UTC) - timedelta(days=31)
    paid = await service.subscription_paid(
        _requester(user), "sub-old", period_end=month_ago + timedelta(days=30), now=month_ago
    )
    account = await shop_stack.client.account(_requester(user))
    assert paid.purchase.tier == "supporter" and account.tier == "supporter"
    # Nobody asks for this account: the bot's own round ends the subscription at its start.
    await shop_stack.stop_bot()
    await shop_stack.start_bot()

    async def dropped() -> bool:
        return (await shop_stack.client.account(_requester(user))).tier == "free"

    async with asyncio.timeout(30):
        while not await dropped():
            await asyncio.sleep(0.05)
    assert (await service.get("telegram:sub-old")).status == PurchaseStatus.ended


async def test_linked_accounts_share_a_pack_bought_on_either_platform(shop_stack: Stack) -> None:
    fake, user = shop_stack.fake, 5007
    discord = Requester(platform="discord", platform_user_id="77007")
    code = await shop_stack.client.create_link_code(_requester(user))
    await shop_stack.client.redeem_link_code(discord, code.code)
    small = (await _invoices(fake, user))["100 credits"]
    sent = len(fake.calls_of("sendMessage", chat=user))
    await _pay(fake, user, small, "charge-linked", sent + 1)
    # Bought on Telegram, spendable from Discord; a pack bought on Discord adds to the same.
    on_discord = await shop_stack.client.balance(discord)
    assert on_discord.total == await shop_stack.balance(user)
    assert [p.amount for p in on_discord.packs] == [100]
    service = _service(shop_stack)
    await service.pack_paid(discord, "ent-linked", service.pack("large"))
    assert await shop_stack.balance(user) == on_discord.total + 500
    summary = await service.summary(discord)
    assert {p.key for p in summary.purchases} == {"telegram:charge-linked", "discord:ent-linked"}


async def test_a_refund_made_by_telegram_is_taken_back_once_and_told(shop_stack: Stack) -> None:
    """Telegram support refunded a payment (no /refund here): its refunded_payment message,
    delivered twice, takes back what is left once and tells the person once."""
    fake, user = shop_stack.fake, 5008
    small = (await _invoices(fake, user))["100 credits"]
    sent = len(fake.calls_of("sendMessage", chat=user))
    await _pay(fake, user, small, "charge-support", sent + 1)
    account = await shop_stack.client.account(_requester(user))
    allowance = shop_stack.settings.tiers["free"].daily_allowance
    with shop_stack.sessions.begin() as s:  # a job spent the day's allowance and 40 of the pack
        now = datetime.now(UTC)
        ledger.reserve(session=s, account_id=account.id, job_id="spent-40",
                       amount=allowance + 40, now=now, tiers=shop_stack.settings.tiers)
        ledger.capture(session=s, job_id="spent-40", now=now)
    refund = fake.refund_message(user, "charge-support")
    assert refund["message"]["refunded_payment"]["invoice_payload"] == "pack:small:100:90"
    await fake.push(refund)
    await fake.push(refund)  # the same update again
    told = (await fake.wait_call("sendMessage", chat=user, n=sent + 2)).params["text"]
    assert "was refunded: 60 of its 100 credits were taken back (40 already spent)" in told
    assert "Credits now: 0." in told
    bought = await _service(shop_stack).get("telegram:charge-support")
    assert (bought.status, bought.clawed_back, bought.owed) == (PurchaseStatus.refunded, 60, 40)
    await asyncio.sleep(0.5)  # the duplicate has been handled by now: nothing more said
    assert len(fake.calls_of("sendMessage", chat=user)) == sent + 2
    assert not fake.calls_of("refundStarPayment")  # Telegram refunded it; nobody here did
    with shop_stack.sessions() as s:
        audit = ledger.audit(session=s, account_id=account.id)
    assert audit.balanced and audit.conserved and audit.refunded == 60


async def test_a_refund_that_arrives_before_its_payment_credits_nothing(
    shop_stack: Stack,
) -> None:
    fake, user = shop_stack.fake, 5009
    small = (await _invoices(fake, user))["100 credits"]
    before = await shop_stack.balance(user)
    sent = len(fake.calls_of("sendMessage", chat=user))
    payment = fake.payment(user, small, "charge-late")
    await fake.push(fake.refund_message(user, "charge-late"))
    told = (await fake.wait_call("sendMessage", chat=user, n=sent + 1)).params["text"]
    assert "refunded before it was credited: nothing was added" in told
    await fake.push(payment)  # the payment's update, overtaken by its refund
    late = (await fake.wait_call("sendMessage", chat=user, n=sent + 2)).params["text"]
    assert "That payment was refunded, so nothing was added for it." in late
    assert await shop_stack.balance(user) == before
    bought = await _service(shop_stack).get("telegram:charge-late")
    assert (bought.status, bought.credits, bought.product) == (PurchaseStatus.refunded, 0, "small")


async def test_operator_refund_followed_by_telegrams_refund_message_takes_back_once(
    shop_stack: Stack,
) -> None:
    """refundStarPayment makes Telegram send refunded_payment as well (the fake does): the
    operator's /refund and that message race; the pack is taken back once, either way."""
    fake, user = shop_stack.fake, 5010
    small = (await _invoices(fake, user))["100 credits"]
    sent = len(fake.calls_of("sendMessage", chat=user))
    await _pay(fake, user, small, "charge-both", sent + 1)
    await fake.send(OPERATOR, "/refund charge-both")
    reply = (await fake.wait_call("sendMessage", chat=OPERATOR)).params["text"]
    assert "took back 100 of 100 credits" in reply
    bought = await _service(shop_stack).get("telegram:charge-both")
    assert (bought.status, bought.clawed_back) == (PurchaseStatus.refunded, 100)
    with shop_stack.sessions() as s:
        audit = ledger.audit(session=s, account_id=bought.account_id)
    assert audit.balanced and audit.conserved and audit.refunded == 100
