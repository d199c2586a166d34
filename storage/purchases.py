"""Purchases: a pack or a subscription paid on a platform, recorded once by its charge or
entitlement id, linked to the credit pack it granted; refunds take back what is left of it.

Every function runs in the caller's transaction. A purchase row is the record of the payment and
is never rolled up or pruned; the pack's bucket (never pruned either) is what a refund reads, so
a refund stays exact after ``atelier db prune`` rolled old ledger rows into carry rows."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import or_
from sqlmodel import Session, col, select

from core.errors import Conflict, InvalidRequest, NotFound
from storage import accounts, ledger
from storage.models import (
    Account,
    CreditBucket,
    CreditKind,
    CreditLedger,
    Purchase,
    PurchaseKind,
    PurchaseStatus,
)


class PurchaseRead(BaseModel):
    id: int
    key: str
    account_id: int
    platform: str
    platform_user_id: str
    kind: PurchaseKind
    product: str
    credits: int
    tier: str | None
    status: PurchaseStatus
    expires_at: datetime | None
    created_at: datetime
    refunded_at: datetime | None
    clawed_back: int
    owed: int


class Recorded(BaseModel):
    purchase: PurchaseRead
    created: bool  # False: this payment was seen before and credited nothing now


def purchase_key(platform: str, charge_id: str) -> str:
    if not charge_id or len(charge_id) > 150:
        raise InvalidRequest(f"a charge id must be 1 to 150 characters, got {charge_id[:160]!r}")
    return f"{platform}:{charge_id}"


def record_pack(
    *,
    session: Session,
    account_id: int,
    platform: str,
    platform_user_id: str,
    charge_id: str,
    product: str,
    credits: int,
    expires_at: datetime | None,
    now: datetime,
) -> Recorded:
    """Grant a bought pack once per ``charge_id``: the same payment again grants nothing."""
    key = purchase_key(platform, charge_id)
    owner = _lock_owner(session, account_id)
    existing = _find(session, key)
    if existing is not None:  # seen before: paid, or refunded (maybe before it was paid)
        return Recorded(purchase=_read(existing), created=False)
    pack = ledger.grant(
        session=session,
        account_id=owner,
        amount=credits,
        key=key,
        expires_at=expires_at,
        kind=CreditKind.purchase,
        now=now,
        note=f"bought {product} ({key})",
    )
    row = Purchase(
        key=key,
        account_id=owner,
        platform=platform,
        platform_user_id=platform_user_id,
        kind=PurchaseKind.pack,
        product=product,
        credits=credits,
        bucket=pack.key,
        status=PurchaseStatus.paid,
        expires_at=expires_at,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return Recorded(purchase=_read(row), created=True)


def record_subscription(
    *,
    session: Session,
    account_id: int,
    platform: str,
    platform_user_id: str,
    charge_id: str,
    product: str,
    tier: str,
    period_end: datetime,
    known_tiers: Collection[str],
    now: datetime,
) -> Recorded:
    """Put the account on ``tier`` until ``period_end``. A renewal is a new charge (a new row);
    the same charge again only moves its period end (an entitlement update)."""
    key = purchase_key(platform, charge_id)
    owner = _lock_owner(session, account_id)
    row = _find(session, key, lock=True)
    created = row is None
    if row is None:
        row = Purchase(
            key=key,
            account_id=owner,
            platform=platform,
            platform_user_id=platform_user_id,
            kind=PurchaseKind.subscription,
            product=product,
            tier=tier,
            status=PurchaseStatus.paid,
            expires_at=period_end,
            created_at=now,
            updated_at=now,
        )
    elif row.status == PurchaseStatus.paid and row.expires_at != period_end:
        row.expires_at = period_end
        row.updated_at = now
    else:
        return Recorded(purchase=_read(row), created=False)
    session.add(row)
    session.flush()
    if period_end > now:
        accounts.set_tier(session=session, account_id=owner, tier=tier, known_tiers=known_tiers)
    return Recorded(purchase=_read(row), created=created)


@dataclass(frozen=True, slots=True)
class Payer:
    """Who a refund is for, as its event says, for a refund that arrives before its payment:
    the purchase is then recorded as refunded, so the payment credits nothing when it comes."""

    account_id: int
    platform: str
    platform_user_id: str
    kind: PurchaseKind
    product: str


def refund(*, session: Session, key: str, now: datetime, write_off: bool = False) -> PurchaseRead:
    """Take back what is left of a refunded pack (never more: credits already spent are
    recorded as ``owed``, or written off), or end a refunded subscription now. Idempotent."""
    return refund_once(session=session, key=key, now=now, write_off=write_off).purchase


def refund_once(
    *,
    session: Session,
    key: str,
    now: datetime,
    write_off: bool = False,
    payer: Payer | None = None,
) -> Recorded:
    """``refund``, saying whether this call refunded it (``created``; False: refunded before).
    A refund of a payment not seen yet is NotFound, unless ``payer`` says whose it is: then
    it is recorded as refunded with nothing credited, and the payment, when it arrives late,
    credits nothing. The payer's account is locked before the purchase row, as a payment
    locks them, so a refund and a payment of one charge never both win."""
    found = _find(session, key)
    if found is None:
        if payer is None:
            raise NotFound(f"no purchase {key!r}")
        owner = _lock_owner(session, payer.account_id)
        found = _find(session, key, lock=True)
        if found is None:
            tombstone = Purchase(
                key=key,
                account_id=owner,
                platform=payer.platform,
                platform_user_id=payer.platform_user_id,
                kind=payer.kind,
                product=payer.product[:32],
                status=PurchaseStatus.refunded,
                created_at=now,
                updated_at=now,
                refunded_at=now,
            )
            session.add(tombstone)
            session.flush()
            return Recorded(purchase=_read(tombstone), created=True)
    else:
        _lock_owner(session, found.account_id)
    row = _find(session, key, lock=True)
    if row is None:
        raise NotFound(f"no purchase {key!r}")
    if row.status == PurchaseStatus.refunded:
        return Recorded(purchase=_read(row), created=False)
    if row.kind == PurchaseKind.subscription:
        row.status = PurchaseStatus.refunded
        row.refunded_at = row.updated_at = now
        row.expires_at = min(row.expires_at or now, now)
        session.add(row)
        session.flush()
        return Recorded(purchase=_read(row), created=True)
    bucket = session.exec(
        select(CreditBucket)
        .where(CreditBucket.key == row.bucket)
        .execution_options(populate_existing=True)
    ).first()
    if bucket is None:
        raise Conflict(f"purchase {key!r} has no credit pack {row.bucket!r}")
    ledger.lock_accounts(session, [bucket.account_id])
    session.refresh(bucket)
    left = 0 if bucket.expired_at is not None else bucket.remaining
    if left:
        session.add(
            CreditLedger(
                account_id=bucket.account_id,
                kind=CreditKind.refund,
                bucket=bucket.key,
                amount=-left,
                idempotency_key=f"refund:{key}",
                expires_at=bucket.expires_at,
                created_at=now,
                note=f"refund of {row.product} ({key})",
            )
        )
    bucket.remaining = 0
    bucket.expired_at = bucket.expired_at or now
    session.add(bucket)
    spent = row.credits - left
    row.status = PurchaseStatus.refunded
    row.refunded_at = row.updated_at = now
    row.clawed_back = left
    row.owed = 0 if write_off else spent
    session.add(row)
    session.flush()
    return Recorded(purchase=_read(row), created=True)


def lapse_due(
    *, session: Session, now: datetime, default_tier: str, known_tiers: Collection[str]
) -> list[int]:
    """End subscriptions past their period; an account with no paid subscription left goes back
    to ``default_tier``. Returns the accounts whose tier dropped."""
    due = session.exec(
        select(Purchase)
        .where(
            Purchase.kind == PurchaseKind.subscription,
            or_(
                col(Purchase.status) == PurchaseStatus.paid,
                col(Purchase.status) == PurchaseStatus.refunded,
            ),
            col(Purchase.expires_at) <= now,
        )
        .order_by(col(Purchase.id))
    ).all()
    dropped: list[int] = []
    for row in due:
        owner = _live_account(session, row.account_id)
        if row.status == PurchaseStatus.paid:
            row.status = PurchaseStatus.ended
            row.updated_at = now
            session.add(row)
        session.flush()
        if owner in dropped or _active_subscription(session, owner, now) is not None:
            continue
        account = session.get(Account, owner)
        if account is not None and account.tier == row.tier and row.tier != default_tier:
            accounts.set_tier(
                session=session, account_id=owner, tier=default_tier, known_tiers=known_tiers
            )
            dropped.append(owner)
    return dropped


def list_purchases(*, session: Session, account_id: int) -> list[PurchaseRead]:
    """The account's purchases, newest first (those of accounts merged into it included)."""
    merged = select(Account.id).where(
        or_(col(Account.id) == account_id, col(Account.merged_into_id) == account_id)
    )
    rows = session.exec(
        select(Purchase)
        .where(col(Purchase.account_id).in_(merged))
        .order_by(col(Purchase.created_at).desc(), col(Purchase.id).desc())
    ).all()
    return [_read(r) for r in rows]


def active_subscription(*, session: Session, account_id: int, now: datetime) -> PurchaseRead | None:
    row = _active_subscription(session, account_id, now)
    return None if row is None else _read(row)


def get_purchase(*, session: Session, key: str) -> PurchaseRead:
    row = _find(session, key)
    if row is None:
        raise NotFound(f"no purchase {key!r}")
    return _read(row)


# Internals -------------------------------------------------------------------------------------


def _find(session: Session, key: str, *, lock: bool = False) -> Purchase | None:
    stmt = select(Purchase).where(Purchase.key == key).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update()
    return session.exec(stmt).first()


def _lock_owner(session: Session, account_id: int) -> int:
    """Lock the account (and the one it was merged into) before any purchase row: payments
    and refunds of one charge then run one after the other on PostgreSQL, and in one order
    (accounts, then the purchase), so they cannot deadlock. Returns the live owner."""
    owner = _live_account(session, account_id)
    ledger.lock_accounts(session, sorted({account_id, owner}))
    return owner


def _live_account(session: Session, account_id: int) -> int:
    """The account that owns credits now: a merged account's target."""
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    return account_id if account.merged_into_id is None else account.merged_into_id


def _active_subscription(session: Session, account_id: int, now: datetime) -> Purchase | None:
    merged = select(Account.id).where(
        or_(col(Account.id) == account_id, col(Account.merged_into_id) == account_id)
    )
    return session.exec(
        select(Purchase)
        .where(
            col(Purchase.account_id).in_(merged),
            Purchase.kind == PurchaseKind.subscription,
            Purchase.status == PurchaseStatus.paid,
            col(Purchase.expires_at) > now,
        )
        .order_by(col(Purchase.expires_at).desc())
    ).first()


def _read(row: Purchase) -> PurchaseRead:
    return PurchaseRead.model_validate(row, from_attributes=True)
