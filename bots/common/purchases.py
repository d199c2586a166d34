"""Buying credits from a chat, for every platform: what is on sale, the order payload a
payment carries back, the reply after a payment or a refund, and who may refund."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from cluster.purchases import Paid, PurchaseService, Refunded
from core.errors import InvalidRequest
from core.jobs import Requester
from core.settings import Settings
from core.shop import Pack, Shop, Subscription
from storage.models import PurchaseStatus
from storage.purchases import PurchaseRead

log = logging.getLogger(__name__)

NOTHING_FOR_SALE = "Nothing is for sale here yet."
BUY_HINT = "More credits: /buy"


def pack_payload(pack: Pack) -> str:
    """The order a Stars invoice carries (1-128 bytes): what was sold, so a pack withdrawn
    between the invoice and the payment is still credited as sold."""
    lifetime = "" if pack.lifetime_days is None else str(pack.lifetime_days)
    return f"pack:{pack.name}:{pack.credits}:{lifetime}"


def pack_of_payload(payload: str, shop: Shop) -> Pack:
    """The pack an invoice sold (see ``pack_payload``)."""
    kind, name, credits, lifetime = (payload.split(":") + ["", "", ""])[:4]
    if kind != "pack" or not name or not credits.isdigit():
        raise InvalidRequest(f"not a pack order: {payload[:128]!r}")
    on_sale = shop.pack(name)
    return Pack(
        name=name,
        title=on_sale.title if on_sale else f"{credits} credits",
        credits=int(credits),
        lifetime_days=int(lifetime) if lifetime.isdigit() else None,
    )


def pack_description(pack: Pack) -> str:
    life = "never expire" if pack.lifetime_days is None else f"last {pack.lifetime_days} days"
    return f"{pack.credits} Atelier credits for images; they {life}."


def subscription_description(shop: Shop, settings: Settings) -> str:
    sub = shop.subscription
    if sub is None:
        return ""
    tier = settings.tier(sub.tier)
    return (
        f"Tier {sub.tier} for 30 days: {tier.daily_allowance} credits a day, "
        f"{tier.concurrency} jobs at once."
    )


def offer_text(shop: Shop, settings: Settings, *, platform: str) -> str:
    """The heading of /buy: what each offer gives."""
    packs = shop.for_stars() if platform == "telegram" else [
        p for p in shop.packs.values() if p.discord_sku
    ]
    sub = shop.subscription
    sub_here = sub is not None and (sub.stars if platform == "telegram" else sub.discord_sku)
    if not packs and not sub_here:
        return NOTHING_FOR_SALE
    lines = ["Credit packs:"] if packs else []
    for pack in packs:
        price = f" for {pack.stars} ⭐" if platform == "telegram" else ""
        lines.append(f"• {pack.title}{price}: {pack_description(pack)}")
    if sub is not None and sub_here:
        price = f" for {sub.stars} ⭐ a month" if platform == "telegram" else ""
        lines.append(f"Subscription {sub.title}{price}: {subscription_description(shop, settings)}")
    return "\n".join(lines)


def paid_text(paid: Paid) -> str:
    p = paid.purchase
    if p.kind == "subscription":
        until = _date(p.expires_at)
        what = f"You are on tier {p.tier} until {until}."
    else:
        what = f"{p.credits} credits added" + (
            f" (they expire {_date(p.expires_at)})." if p.expires_at else "."
        )
    if not paid.created:
        what = "That payment was already credited."
        if p.status == PurchaseStatus.refunded:
            what = "That payment was refunded, so nothing was added for it."
    return f"✅ Thank you! {what} Credits now: {paid.balance.total}."


def refund_text(p: PurchaseRead) -> str:
    if p.kind == "subscription":
        return f"Refunded {p.key}: the subscription ended."
    return (
        f"Refunded {p.key}: took back {p.clawed_back} of {p.credits} credits; "
        f"{p.owed} already spent (owed)."
    )


def refunded_text(done: Refunded) -> str:
    """What the person is told when a payment of theirs was refunded (by Telegram support,
    or Discord), once."""
    p = done.purchase
    if p.kind == "subscription":
        what = f"↩️ Your payment {p.key.split(':', 1)[1]} was refunded: the subscription ended."
    elif not p.credits:
        what = (f"↩️ Your payment {p.key.split(':', 1)[1]} was refunded before it was "
                "credited: nothing was added for it.")
    else:
        what = (f"↩️ Your payment {p.key.split(':', 1)[1]} was refunded: {p.clawed_back} of "
                f"its {p.credits} credits were taken back")
        what += f" ({p.owed} already spent)." if p.owed else "."
    if done.balance is not None:
        what += f" Credits now: {done.balance.total}."
    return what


def is_operator(settings: Settings, platform: str, user_id: str) -> bool:
    return f"{platform}:{user_id}" in settings.operators


def _date(when: datetime | None) -> str:
    return "never" if when is None else when.strftime("%Y-%m-%d")


async def entitled(
    service: PurchaseService,
    *,
    platform: str,
    user_id: str,
    entitlement_id: str,
    sku_id: str,
    ends_at: datetime | None,
) -> Paid | None:
    """An entitlement to one of the shop's SKUs (a bought pack, or a subscription until
    ``ends_at``), credited once by its id. None: not a SKU of this shop (logged by the caller)."""
    offer = service.shop.by_sku(sku_id)
    requester = Requester(platform=platform, platform_user_id=user_id)
    if isinstance(offer, Pack):
        return await service.pack_paid(requester, entitlement_id, offer)
    if isinstance(offer, Subscription):
        return await service.subscription_paid(requester, entitlement_id, period_end=ends_at)
    return None


async def lapse_loop(service: PurchaseService, interval_s: float = 600.0) -> None:
    """Drop the tier of subscriptions past their period, every ``interval_s`` (each bot runs
    one; a lapse is idempotent, so two bots at once do no harm)."""
    while True:
        try:
            dropped = await service.lapse()
            if dropped:
                log.info("subscriptions lapsed: accounts %s back to the default tier", dropped)
        except Exception as exc:  # the database away a while: try at the next round
            log.warning("could not end lapsed subscriptions: %s", exc)
        await asyncio.sleep(interval_s)
