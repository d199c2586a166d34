"""The purchase service front ends call: check a pack before payment, credit a payment once,
refund, subscriptions and their lapse, and what an account bought. Bookkeeping is in
``storage.purchases``; platform adapters only translate their events into these calls."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.errors import Conflict, NotFound
from core.jobs import Requester
from core.settings import Settings
from core.shop import SUBSCRIPTION_PERIOD_S, Pack, Shop
from storage import accounts, ledger, purchases
from storage.db import Store
from storage.ledger import Balance
from storage.models import utcnow
from storage.purchases import PurchaseRead


class AccountSummary(BaseModel):
    """What an account has: balance, tier (and until when it is paid), purchases."""

    account_id: int
    tier: str
    tier_until: datetime | None
    balance: Balance
    purchases: list[PurchaseRead]


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
        """Before payment: the pack is still on sale at that price and the account can own it."""
        pack = self.pack(name)
        if stars is not None and pack.stars != stars:
            raise Conflict(f"the price of {name!r} changed to {pack.stars} Stars; see /buy")

        def read(session: Session) -> None:
            try:
                accounts.find_account(
                    session=session,
                    platform=requester.platform,
                    platform_user_id=requester.platform_user_id,
                )
            except NotFound:
                return  # a first contact: the account is made at payment

        await self._db(read, read_only=True)
        return pack

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

        return await self._db(credit)

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

        return await self._db(record)

    async def refund(self, key: str, now: datetime | None = None) -> PurchaseRead:
        """Take back what is left of a purchase (``platform:charge id``)."""
        when = now or utcnow()
        write_off = self.shop.refund_policy == "write_off"

        def undo(session: Session) -> PurchaseRead:
            got = purchases.refund(session=session, key=key, now=when, write_off=write_off)
            self._lapse(session, when)
            return got

        return await self._db(undo)

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
