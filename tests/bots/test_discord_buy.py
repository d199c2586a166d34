"""Buying on Discord against the fake: /buy shows premium buttons, an entitlement credits once
(however often it arrives) and is consumed, a deleted one is taken back, a subscription sets
the tier, and entitlements bought while the bot was down are credited when it connects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from cluster.purchases import PurchaseService
from core.jobs import Requester
from storage import ledger
from storage.models import PurchaseStatus
from testing.discord.premium import SUBSCRIPTION_SKU
from testing.discord.server import FakeDiscord
from tests.bots.discord_conftest import DiscordStack, discord_settings_for

PACK_SKU, SUB_SKU = 1_100_000_000_000_000_001, 1_100_000_000_000_000_002
USER = 8101
SHOP = f"""
[packs.small]
title = "100 credits"
credits = 100
discord_sku = "{PACK_SKU}"

[subscription]
title = "Supporter"
tier = "supporter"
discord_sku = "{SUB_SKU}"
"""


@pytest.fixture
async def shop_stack(
    tmp_path: Path, redis_url: str, discord_fake: FakeDiscord
) -> AsyncIterator[DiscordStack]:
    settings = discord_settings_for(tmp_path, redis_url, discord_fake)
    (settings.data_dir / "shop.toml").write_text(SHOP)
    discord_fake.add_sku(PACK_SKU, "100 credits")
    discord_fake.add_sku(SUB_SKU, "Supporter", kind=SUBSCRIPTION_SKU)
    s = DiscordStack(settings, discord_fake, None, settings.data_dir)
    await discord_fake.start()
    await s.start_bot()
    try:
        yield s
    finally:
        await s.close()


def _service(stack: DiscordStack) -> PurchaseService:
    return stack.discord.purchases


async def _purchases(stack: DiscordStack, user: int = USER) -> list[tuple[str, PurchaseStatus]]:
    who = Requester(platform="discord", platform_user_id=str(user))
    summary = await _service(stack).summary(who)
    return [(p.key, p.status) for p in summary.purchases]


async def _eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` (a store read) until it holds: gateway events are handled in the bot."""
    async with asyncio.timeout(30):
        while not await check():
            await asyncio.sleep(0.05)


async def _credited(stack: DiscordStack, n: int, user: int = USER) -> None:
    async def enough() -> bool:
        return len(await _purchases(stack, user)) >= n

    await _eventually(enough, f"{n} purchases recorded")


async def test_buy_shows_a_premium_button_per_sku(shop_stack: DiscordStack) -> None:
    fake = shop_stack.fake
    inter = await fake.slash(USER, "buy")
    await fake.wait_for(lambda: inter.callback is not None, 30, "the answer to /buy")
    assert inter.callback is not None
    data = inter.callback.json["data"]
    buttons = [c for row in data["components"] for c in row["components"]]
    assert [(b["style"], int(b["sku_id"])) for b in buttons] == [(6, PACK_SKU), (6, SUB_SKU)]
    assert "100 credits" in data["content"] and data["flags"] & 64


async def test_entitlement_credits_once_and_is_consumed(shop_stack: DiscordStack) -> None:
    fake = shop_stack.fake
    before = await shop_stack.balance(USER)
    ent = await fake.entitle(USER, PACK_SKU)
    await fake.wait_for(lambda: ent["consumed"], 30, "the entitlement consumed")
    # The same entitlement again (a replayed event, an update): credited once.
    await fake.dispatch("ENTITLEMENT_CREATE", ent)
    await fake.update_entitlement(int(ent["id"]))
    await shop_stack.discord.get_cog("Buy").reconcile()  # type: ignore[union-attr]
    assert await shop_stack.balance(USER) == before + 100
    assert await _purchases(shop_stack) == [(f"discord:{ent['id']}", PurchaseStatus.paid)]
    assert len(fake.calls_to("/consume")) == 1
    # Refunded on Discord: the entitlement is deleted; what is left is taken back.
    await fake.delete_entitlement(int(ent["id"]))
    async def refunded() -> bool:
        return (await _purchases(shop_stack))[0][1] == PurchaseStatus.refunded

    await _eventually(refunded, "the refund recorded")
    assert await shop_stack.balance(USER) == before
    summary = await _service(shop_stack).summary(
        Requester(platform="discord", platform_user_id=str(USER))
    )
    with shop_stack.sessions() as s:
        audit = ledger.audit(session=s, account_id=summary.account_id)
    assert audit.balanced and audit.conserved and audit.refunded == 100


async def test_entitlement_bought_while_the_bot_was_down_is_credited_at_start(
    shop_stack: DiscordStack,
) -> None:
    fake = shop_stack.fake
    await shop_stack.stop_bot()
    ent = await fake.entitle(USER, PACK_SKU, announce=False)  # nobody hears the event
    await shop_stack.start_bot()
    await fake.wait_for(lambda: ent["consumed"], 30, "the missed entitlement consumed")
    assert await _purchases(shop_stack) == [(f"discord:{ent['id']}", PurchaseStatus.paid)]
    # Another restart reconciles again: still credited once.
    await shop_stack.stop_bot()
    await shop_stack.start_bot()
    await shop_stack.discord.get_cog("Buy").reconcile()  # type: ignore[union-attr]
    summary = await _service(shop_stack).summary(
        Requester(platform="discord", platform_user_id=str(USER))
    )
    assert len(summary.purchases) == 1
    assert summary.balance.total == 100 + shop_stack.settings.tiers["free"].daily_allowance


async def test_subscription_entitlement_sets_the_tier_and_lapses(shop_stack: DiscordStack) -> None:
    fake = shop_stack.fake
    ends = fake.clock.now() + timedelta(days=30)
    ent = await fake.entitle(USER, SUB_SKU, ends_at=ends)
    await _credited(shop_stack, 1)
    service = _service(shop_stack)
    who = Requester(platform="discord", platform_user_id=str(USER))
    summary = await service.summary(who)
    assert summary.tier == "supporter" and summary.tier_until == ends
    assert not ent["consumed"]  # a subscription is not consumed
    await service.lapse(ends + timedelta(seconds=1))
    later = await service.summary(who, now=ends + timedelta(seconds=2))
    assert later.tier == "free" and later.purchases[0].status == PurchaseStatus.ended
