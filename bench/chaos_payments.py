"""The chaos campaign's payment fault: payment updates duplicated and out of order. Each fault
buys a pack on Telegram (a successful_payment delivered two or three times, a refund that
arrives before its payment or interleaved with it, credits spent between the payment and its
refund) and on Discord (entitlement create / update / delete events duplicated and reordered,
a refund while the bot is away, the start-up reconcile pass racing a live event), through the
real bots against the loopback fakes. ``audit`` then checks the promises: each charge or
entitlement credits once, a refund takes back what is left (never more: what was spent is
owed), and the ledger sums equal the balances.

bench/chaos.py injects it among the other faults (kind ``payment``);
tests/cluster/test_chaos_payments.py runs it alone at small size."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from bots.common.purchases import pack_payload
from core.errors import InsufficientCredits, NotFound
from core.settings import Settings
from core.shop import Pack
from storage import accounts, ledger
from storage.db import read_only_sessions, transaction
from storage.models import (
    CreditBucket,
    CreditKind,
    CreditLedger,
    Purchase,
    PurchaseStatus,
    utcnow,
)

if TYPE_CHECKING:
    from testing.discord.server import FakeDiscord
    from testing.telegram import FakeTelegram

log = logging.getLogger("chaos")

SMALL_SKU, LARGE_SKU = 1_200_000_000_000_000_001, 1_200_000_000_000_000_002
PACKS = {
    "small": Pack(name="small", title="100 credits", credits=100, stars=50,
                  discord_sku=str(SMALL_SKU)),
    "large": Pack(name="large", title="500 credits", credits=500, lifetime_days=None,
                  stars=200, discord_sku=str(LARGE_SKU)),
}
# The shop both bots sell from (shop.toml in the data dir); refunds record what was spent.
SHOP_TOML = """refund_policy = "owed"
""" + "".join(
    f'\n[packs.{p.name}]\ntitle = "{p.title}"\ncredits = {p.credits}\nstars = {p.stars}\n'
    f'discord_sku = "{p.discord_sku}"\n'
    + (f"lifetime_days = {p.lifetime_days}\n" if p.lifetime_days else "")
    for p in PACKS.values()
)
TELEGRAM_BUYERS = tuple(range(90_001, 90_007))
DISCORD_BUYERS = tuple(range(91_001, 91_007))
TELEGRAM_SCENARIOS = ("duplicate", "refund_first", "interleaved", "spend_then_refund")
DISCORD_SCENARIOS = ("duplicate", "delete_first", "interleaved", "reconcile_race")

Event = tuple[str, Callable[[], Awaitable[Any]]]  # (name, send it)


@dataclasses.dataclass
class Charge:
    """One payment the fault made, and what the bots were told about it."""

    platform: str
    key: str  # the purchase key: "telegram:{charge id}" / "discord:{entitlement id}"
    user: int
    pack: Pack
    scenario: str
    events: list[str] = dataclasses.field(default_factory=list)  # in the order sent
    refunded: bool = False  # a refund was made (its event sent, or not heard: a missed one)
    spent: int = 0  # credits spent by a job between the payment and the refund

    @property
    def detail(self) -> str:
        return f"{self.key} {self.pack.name} {self.scenario}: {' '.join(self.events)}"


@dataclasses.dataclass
class DiscordBot:
    """How the fault takes the Discord bot away and brings it back (a process, or in-process
    in the test): a restart runs the start-up reconcile pass."""

    down: Callable[[], Awaitable[None]]
    up: Callable[[], Awaitable[None]]


class Payments:
    """Makes payment faults against the bots on ``telegram`` (and ``discord``, when given),
    remembers each charge, and audits them in the store ``sessions`` open."""

    def __init__(
        self,
        settings: Settings,
        telegram: FakeTelegram,
        discord: FakeDiscord | None = None,
        discord_bot: DiscordBot | None = None,
        *,
        sessions: sessionmaker[Session],
    ) -> None:
        self.settings = settings
        self.telegram, self.discord, self.discord_bot = telegram, discord, discord_bot
        for pack in PACKS.values():  # Discord sells them as consumable SKUs
            if discord is not None and pack.discord_sku:
                discord.add_sku(int(pack.discord_sku), pack.title)
        self.charges: list[Charge] = []
        self._restart = asyncio.Lock()  # one bot restart at a time
        # The store's own sessions (SQLite: its writers queue on one lock in this process);
        # reads in deferred transactions that never queue behind the bots' writes.
        self._sessions = sessions
        self._reads = read_only_sessions(sessions)

    async def fault(
        self, x: float, *, telegram: str | None = None, discord: str | None = None
    ) -> str:
        """One payment fault (its choices drawn from ``x``; ``telegram`` / ``discord`` name
        the scenarios instead): a Telegram charge and, with a Discord fake, an entitlement, at
        once. Returns what it did."""
        rng = random.Random(x)
        work = [self._telegram(rng, telegram)]
        if self.discord is not None:
            work.append(self._discord(random.Random(rng.random()), discord))
        charges = await asyncio.gather(*work)
        return "; ".join(c.detail for c in charges)

    # Telegram -------------------------------------------------------------------------------

    async def _telegram(self, rng: random.Random, scenario: str | None) -> Charge:
        tg = self.telegram
        pack = PACKS[rng.choice(sorted(PACKS))]
        user = rng.choice(TELEGRAM_BUYERS)
        charge_id = f"stars-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}"
        scenario = scenario or rng.choice(TELEGRAM_SCENARIOS)
        c = Charge("telegram", f"telegram:{charge_id}", user, pack, scenario)
        self.charges.append(c)
        payment = {
            "currency": "XTR", "total_amount": pack.stars, "invoice_payload": pack_payload(pack),
            "telegram_payment_charge_id": charge_id, "provider_payment_charge_id": "",
        }
        paid = tg.message(user, successful_payment=payment)

        def pay() -> Event:
            return "pay", lambda: tg.push(dict(paid))

        def refund() -> Event:
            c.refunded = True
            msg = tg.refund_message(user, charge_id, invoice_payload=payment["invoice_payload"],
                                    total_amount=pack.stars)
            return "refund", lambda: tg.push(msg)

        if scenario == "duplicate":
            await self._send(c, [pay() for _ in range(rng.randint(2, 3))], rng)
        elif scenario == "refund_first":
            await self._send(c, [refund()], rng)
            await self._send(c, [pay() for _ in range(rng.randint(1, 2))], rng)
        elif scenario == "interleaved":
            events = [pay(), pay(), refund(), refund()]
            rng.shuffle(events)
            await self._send(c, events, rng)
        else:  # spend_then_refund: a job spends part of the pack, then a refund (twice)
            await self._send(c, [pay()], rng)
            await self._credited(c)
            c.spent = await self._spend(c, rng.randint(1, pack.credits))
            await self._send(c, [refund(), refund()], rng)
        return c

    # Discord --------------------------------------------------------------------------------

    async def _discord(self, rng: random.Random, scenario: str | None) -> Charge:
        dc = self.discord
        assert dc is not None
        pack = PACKS[rng.choice(sorted(PACKS))]
        user = rng.choice(DISCORD_BUYERS)
        scenario = scenario or rng.choice(DISCORD_SCENARIOS)
        if scenario == "reconcile_race" and self.discord_bot is None:
            scenario = "interleaved"
        ent = await dc.entitle(user, int(str(pack.discord_sku)), announce=False)
        ent_id = int(ent["id"])
        c = Charge("discord", f"discord:{ent_id}", user, pack, scenario)
        self.charges.append(c)
        created = dict(ent)

        def create() -> Event:
            return "create", lambda: dc.dispatch("ENTITLEMENT_CREATE", dict(created))

        def update() -> Event:
            return "update", lambda: dc.dispatch("ENTITLEMENT_UPDATE", dict(created))

        def delete() -> Event:
            c.refunded = True
            dc.entitlements[ent_id]["deleted"] = True  # refunded: Discord's list shows it so
            return "delete", lambda: dc.dispatch("ENTITLEMENT_DELETE", dict(
                dc.entitlements[ent_id]))

        if scenario == "duplicate":
            events = [create() for _ in range(rng.randint(2, 3))] + [update()]
            rng.shuffle(events)
            await self._send(c, events, rng)
        elif scenario == "delete_first":
            await self._send(c, [delete()], rng)
            await self._send(c, [create(), update()], rng)
        elif scenario == "interleaved":
            events = [create(), create(), update(), delete(), delete()]
            rng.shuffle(events)
            await self._send(c, events, rng)
        else:
            await self._reconcile_race(c, rng, create, delete)
        return c

    async def _reconcile_race(
        self, c: Charge, rng: random.Random, create: Callable[[], Event],
        delete: Callable[[], Event],
    ) -> None:
        """The bot is away while the entitlement is bought (and maybe refunded: that delete
        event reaches nobody); as it comes back, its start-up pass over the entitlements
        races a live create (or delete) event of the same entitlement."""
        dc, bot = self.discord, self.discord_bot
        assert dc is not None and bot is not None
        async with self._restart:
            await bot.down()
            c.events.append("(bot down)")
            missed = rng.random() < 0.5
            if missed:
                await self._send(c, [delete()], rng)
            seen = dc.identifies
            await bot.up()
            await dc.wait_for(lambda: dc.identifies > seen, 120, "the Discord bot back")
            c.events.append("(bot up)")
            live = [create()] + ([] if missed or rng.random() < 0.5 else [delete()])
            await self._send(c, live, rng, spread_s=0.2)

    # Shared ---------------------------------------------------------------------------------

    async def _send(self, c: Charge, events: list[Event], rng: random.Random,
                    spread_s: float = 0.5) -> None:
        """Send ``events`` at random moments within ``spread_s`` (some at once): the bot
        handles updates concurrently, so later ones often overtake earlier ones."""

        async def one(name: str, send: Callable[[], Awaitable[Any]], delay: float) -> None:
            await asyncio.sleep(delay)
            c.events.append(name)
            await send()

        await asyncio.gather(*(
            one(name, send, rng.choice((0.0, rng.uniform(0, spread_s))))
            for name, send in events
        ))

    async def _credited(self, c: Charge, timeout_s: float = 120) -> None:
        def look() -> bool:
            with transaction(self._reads) as s:
                row = s.exec(select(Purchase).where(Purchase.key == c.key)).first()
                return row is not None and row.status == PurchaseStatus.paid

        async with asyncio.timeout(timeout_s):
            while not await asyncio.to_thread(look):
                await asyncio.sleep(0.1)

    async def _spend(self, c: Charge, amount: int) -> int:
        """A job that spends ``amount`` credits past today's allowance (so from the packs,
        soonest-expiring first), charged as a job is: reserved, then captured. Returns what
        it spent (0: the credits were gone already)."""
        job_id = f"payspend-{uuid.uuid4().hex[:12]}"

        def spend() -> int:
            with transaction(self._sessions) as s:
                acc = accounts.find_account(session=s, platform=c.platform,
                                            platform_user_id=str(c.user))
                now = utcnow()
                daily = ledger.balance(session=s, account_id=acc.id, now=now,
                                       tiers=self.settings.tiers).daily_left
                ledger.reserve(session=s, account_id=acc.id, job_id=job_id,
                               amount=daily + amount, now=now, tiers=self.settings.tiers)
                ledger.capture(session=s, job_id=job_id, now=now)
            return amount

        try:
            return await asyncio.to_thread(spend)
        except (InsufficientCredits, NotFound):
            return 0

    # Settling and the audit -----------------------------------------------------------------

    def _state(self) -> dict[str, Purchase]:
        with transaction(self._reads) as s:
            rows = s.exec(select(Purchase).where(
                col(Purchase.key).in_([c.key for c in self.charges]))).all()
            return {r.key: r for r in rows}

    def _pending(self) -> list[Charge]:
        rows = self._state()
        want = {True: PurchaseStatus.refunded, False: PurchaseStatus.paid}
        return [c for c in self.charges
                if (r := rows.get(c.key)) is None or r.status != want[c.refunded]]

    async def settle(self, timeout_s: float = 120) -> None:
        """Wait until every charge is recorded as its events say (paid, or refunded), or
        ``timeout_s``; the audit reports what did not get there."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await asyncio.to_thread(self._pending) and loop.time() < deadline:
            await asyncio.sleep(0.25)

    def audit(self) -> list[str]:
        """Violations of the payment promises (none expected), one line each."""
        out: list[str] = []
        rows = self._state()
        with transaction(self._reads) as s:
            for c in self.charges:
                out += self._check(s, c, rows.get(c.key))
            account_ids: set[int] = set()
            for platform, users in (("telegram", TELEGRAM_BUYERS), ("discord", DISCORD_BUYERS)):
                for user in users:
                    try:
                        acc = accounts.find_account(session=s, platform=platform,
                                                    platform_user_id=str(user))
                    except NotFound:
                        continue
                    account_ids.add(acc.id)
            for account_id in sorted(account_ids):
                a = ledger.audit(session=s, account_id=account_id)
                if not (a.balanced and a.conserved and a.held == 0):
                    out.append(f"payments: account {account_id} ledger: {a!r}")
        return out

    def _check(self, s: Session, c: Charge, row: Purchase | None) -> list[str]:
        name = f"payments: {c.detail}"
        if row is None:
            return [f"{name}: no purchase recorded"]
        out: list[str] = []
        want = PurchaseStatus.refunded if c.refunded else PurchaseStatus.paid
        if row.status != want:
            out.append(f"{name}: {row.status.value}, want {want.value}")

        def rows_of(key: str) -> list[CreditLedger]:
            return list(s.exec(select(CreditLedger).where(
                CreditLedger.idempotency_key == key)).all())

        granted = s.exec(select(func.count()).select_from(CreditLedger).where(
            col(CreditLedger.bucket) == f"pack:{c.key}",
            col(CreditLedger.kind).in_((CreditKind.purchase, CreditKind.admin)),
        )).one()
        took = rows_of(f"refund:{c.key}")
        if not row.bucket:  # refunded before it was paid: never credited
            if granted or took or row.credits:
                out.append(f"{name}: refunded before payment, yet {granted} grant(s), "
                           f"{len(took)} take-back(s), credits {row.credits}")
            return out
        bucket = s.exec(select(CreditBucket).where(CreditBucket.key == row.bucket)).first()
        if granted != 1 or bucket is None or bucket.granted != c.pack.credits:
            out.append(f"{name}: credited {granted} times "
                       f"({None if bucket is None else bucket.granted} credits), want once "
                       f"({c.pack.credits})")
        if len(took) > 1:
            out.append(f"{name}: taken back {len(took)} times")
        if row.status == PurchaseStatus.refunded:
            back = -sum(r.amount for r in took)
            if back != row.clawed_back or row.clawed_back + row.owed != row.credits:
                out.append(f"{name}: refund took {back} (recorded {row.clawed_back}) and "
                           f"owes {row.owed} of {row.credits}")
            if bucket is not None and bucket.remaining != 0:
                out.append(f"{name}: {bucket.remaining} credits left after the refund")
            # What jobs spent from this pack (reserved, less what releases gave back) is what
            # the refund must leave alone: owed, never taken back.
            spent = -int(s.exec(select(func.coalesce(func.sum(CreditLedger.amount), 0)).where(
                col(CreditLedger.bucket) == row.bucket,
                col(CreditLedger.kind).in_((CreditKind.reserve, CreditKind.release)),
            )).one())
            if row.owed != spent or row.clawed_back != row.credits - spent:
                out.append(f"{name}: {spent} spent from it, yet the refund took "
                           f"{row.clawed_back} and records {row.owed} owed")
        return out

    def counts(self) -> dict[str, int]:
        """Charges by platform and scenario (for the report)."""
        out: dict[str, int] = {}
        for c in self.charges:
            out[f"{c.platform} {c.scenario}"] = out.get(f"{c.platform} {c.scenario}", 0) + 1
        return out
