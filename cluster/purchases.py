"""The purchase service front ends call: check a pack before payment, credit a payment once,
refund, subscriptions and their lapse, and what an account bought. Bookkeeping is in
``storage.purchases``; platform adapters only translate their events into these calls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.errors import Conflict, NotFound
from core.jobs import Requester
from core.settings import Settings
from core.shop import SUBSCRIPTION_PERIOD_S, Pack, Shop
from storage import accounts, ledger, purchases
from storage.db import STORE_ERRORS, Store
from storage.ledger import Balance
from storage.models import PurchaseKind, utcnow
from storage.purchases import PurchaseRead

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a payment or refund waits out an unreachable store before it gives up (logged).
STORE_RETRY_S = 120.0


class AccountSummary(BaseModel):
    """What an account has: balance, tier (and until when it is paid), purchases."""

    account_id: int
    tier: str
    tier_until: datetime | None
    balance: Balance
    purchases: list[PurchaseRead]


@dataclass(frozen=True, slots=True)
class Refunded:
    purchase: PurchaseRead
    created: bool  # False: refunded before (a duplicate event); nothing was taken now
    balance: Balance | None  # the payer's, when the event named the payer


@dataclass(frozen=True, slots=True)
class Paid:
    purchase: PurchaseRead
    created: bool  # False: a duplicate delivery; nothing was credited now
    balance: Balance


class PurchaseService:
    """Every method runs one transaction off the event loop."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], shop: Shop) -> None:
        self.settings = settings
        self.shop = shop
        self._db = Store(sessions)

    def pack(self, name: str) -> Pack:
        """The pack on sale under ``name``; Conflict when it was withdrawn."""
        pack = self.shop.pack(name)
        if pack is None:
            raise Conflict(f"the pack {name!r} is no longer on sale; see /buy")
        return pack

    async def check(self, requester: Requester, name: str, stars: int | None = None) -> Pack:
        """Before payment: the pack is still on sale at that price and the account is not
        blocked (``check_account``)."""
        pack = self.pack(name)
        if stars is not None and pack.stars != stars:
            raise Conflict(f"the price of {name!r} changed to {pack.stars} Stars; see /buy")

        await self.check_account(requester)
        return pack

    async def check_account(self, requester: Requester) -> None:
        """Before payment: AccountBlocked (with the operator's reason) when the payer's
        account is blocked; a first contact is not (its account is made at payment)."""

        def read(session: Session) -> None:
            try:
                account = accounts.find_account(
                    session=session,
                    platform=requester.platform,
                    platform_user_id=requester.platform_user_id,
                )
            except NotFound:
                return
            accounts.refuse_blocked(account)

        await self._db(read, read_only=True)

    async def pack_paid(
        self, requester: Requester, charge_id: str, pack: Pack, now: datetime | None = None
    ) -> Paid:
        """Credit a paid pack once per ``charge_id`` and say the balance after."""
        now = now or utcnow()

        def credit(session: Session) -> Paid:
            acc = self._resolve(session, requester, now)
            got = purchases.record_pack(
                session=session,
                account_id=acc,
                platform=requester.platform,
                platform_user_id=requester.platform_user_id,
                charge_id=charge_id,
                product=pack.name,
                credits=pack.credits,
                expires_at=None if pack.lifetime is None else now + pack.lifetime,
                now=now,
            )
            return Paid(got.purchase, got.created, self._balance(session, acc, now))

        return await self._write(credit)

    async def subscription_paid(
        self,
        requester: Requester,
        charge_id: str,
        period_end: datetime | None = None,
        now: datetime | None = None,
    ) -> Paid:
        """Put the payer on the subscription's tier until ``period_end`` (30 days by default)."""
        sub = self.shop.subscription
        if sub is None:
            raise Conflict("no subscription is on sale")
        now = now or utcnow()
        end = period_end or now + timedelta(seconds=SUBSCRIPTION_PERIOD_S)

        def record(session: Session) -> Paid:
            acc = self._resolve(session, requester, now)
            got = purchases.record_subscription(
                session=session,
                account_id=acc,
                platform=requester.platform,
                platform_user_id=requester.platform_user_id,
                charge_id=charge_id,
                product=sub.name,
                tier=sub.tier,
                period_end=end,
                known_tiers=self.settings.tiers,
                now=now,
            )
            return Paid(got.purchase, got.created, self._balance(session, acc, now))

        return await self._write(record)

    async def refund(self, key: str, now: datetime | None = None) -> PurchaseRead:
        """Take back what is left of a purchase (``platform:charge id``)."""
        return (await self.refunded(key, now=now)).purchase

    async def refunded(
        self,
        key: str,
        *,
        payer: Requester | None = None,
        kind: PurchaseKind = PurchaseKind.pack,
        product: str = "",
        now: datetime | None = None,
    ) -> Refunded:
        """A refund the platform announced (Telegram's refunded_payment, a deleted Discord
        entitlement), taken back once: ``created`` is False when it was refunded before. With
        ``payer``, a refund that arrives before its payment is recorded (as ``kind`` of
        ``product``), so the late payment credits nothing."""
        when = now or utcnow()
        write_off = self.shop.refund_policy == "write_off"

        def undo(session: Session) -> Refunded:
            who = None
            if payer is not None:
                acc = self._resolve(session, payer, when)
                who = purchases.Payer(acc, payer.platform, payer.platform_user_id, kind, product)
            got = purchases.refund_once(
                session=session, key=key, now=when, write_off=write_off, payer=who
            )
            self._lapse(session, when)
            balance = None if who is None else self._balance(session, who.account_id, when)
            return Refunded(got.purchase, got.created, balance)

        return await self._write(undo)

    async def get(self, key: str) -> PurchaseRead:
        return await self._db(lambda s: purchases.get_purchase(session=s, key=key), read_only=True)

    async def lapse(self, now: datetime | None = None) -> list[int]:
        """Drop the tier of accounts whose subscription period ended; returns those accounts."""
        when = now or utcnow()
        return await self._db(lambda s: self._lapse(s, when))

    async def summary(self, requester: Requester, now: datetime | None = None) -> AccountSummary:
        when = now or utcnow()

        def read(session: Session) -> AccountSummary:
            self._lapse(session, when)
            acc = self._resolve(session, requester, when)
            return self.summary_of(session, acc, when)

        return await self._db(read)

    def summary_of(self, session: Session, account_id: int, now: datetime) -> AccountSummary:
        """In the caller's transaction (the web app's)."""
        acc = accounts.get_account(session=session, account_id=account_id)
        sub = purchases.active_subscription(session=session, account_id=account_id, now=now)
        return AccountSummary(
            account_id=account_id,
            tier=acc.tier,
            tier_until=None if sub is None else sub.expires_at,
            balance=self._balance(session, account_id, now),
            purchases=purchases.list_purchases(session=session, account_id=account_id),
        )

    # Internals ----------------------------------------------------------------------------

    async def _write(self, fn: Callable[[Session], T]) -> T:
        """``fn`` in one transaction, tried again while the store is unreachable (a database
        restarting) for up to ``STORE_RETRY_S``: a payment event comes once and is not sent
        again, so giving up on it would lose it. Each write is idempotent by its charge id,
        so trying again never credits twice."""
        deadline = time.monotonic() + STORE_RETRY_S
        wait = 0.2
        while True:
            try:
                return await self._db(fn)
            except STORE_ERRORS as exc:
                if time.monotonic() + wait > deadline:
                    raise
                log.warning("store unavailable for a payment (%s); trying again in %.1f s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__, wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _resolve(self, session: Session, requester: Requester, now: datetime) -> int:
        acc = accounts.resolve_account(
            session=session,
            platform=requester.platform,
            platform_user_id=requester.platform_user_id,
            display_name=requester.display_name,
            default_tier=self.settings.default_tier,
            now=now,
        )
        return acc.id

    def _balance(self, session: Session, account_id: int, now: datetime) -> Balance:
        return ledger.balance(
            session=session, account_id=account_id, now=now, tiers=self.settings.tiers
        )

    def _lapse(self, session: Session, now: datetime) -> list[int]:
        return purchases.lapse_due(
            session=session,
            now=now,
            default_tier=self.settings.default_tier,
            known_tiers=self.settings.tiers,
        )
