"""The credit ledger: a daily allowance and packs held in buckets, reserved, captured or released
per job. Every operation runs in the caller's transaction and is idempotent by job id or key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta

from pydantic import BaseModel
from sqlalchemy import func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import ConfigError, Conflict, InsufficientCredits, InvalidRequest, NotFound
from core.settings import Tier
from storage.models import (
    Account,
    BucketKind,
    CreditBucket,
    CreditKind,
    CreditLedger,
    Reservation,
    ReservationStatus,
    utcnow,
)

# Locking. SQLite: every write transaction starts with ``BEGIN IMMEDIATE`` (storage.db), so a
# transaction that reads a balance holds the database write lock until it commits. PostgreSQL
# (READ COMMITTED): an operation on an account's credits first takes the account row lock and then
# its unexpired buckets' row locks in id order (``SELECT ... FOR UPDATE``); decrements are also
# conditional (``UPDATE ... SET remaining = remaining - :n WHERE id = :id AND remaining >= :n``)
# behind ``CHECK (remaining >= 0)``. Capture and release settle a reservation with a conditional
# ``UPDATE ... WHERE status = 'held'``; release then locks the buckets of its split in id order.
# Bucket locks are always taken in id order, so these transactions cannot deadlock each other.
#
# Sign convention: each row's ``amount`` is its effect on the spendable balance, so per account
# ``sum(amount)`` equals the remaining credits of its live buckets. A reserve is negative, a release
# positive, a capture 0 (the credits already left at reserve; the row records that the hold became
# a charge), an expire removes what was left in a bucket.

GRANT_KINDS = (CreditKind.grant, CreditKind.purchase, CreditKind.admin)


class PackCredits(BaseModel):
    amount: int
    expires_at: datetime | None


class Balance(BaseModel):
    """What an account can spend now."""

    daily_left: int
    daily_allowance: int
    packs: list[PackCredits]  # soonest-expiring first
    total: int
    next_reset: datetime


class ReservationRead(BaseModel):
    job_id: str
    account_id: int
    amount: int
    status: ReservationStatus
    created_at: datetime
    updated_at: datetime


class BucketRead(BaseModel):
    key: str
    account_id: int
    kind: BucketKind
    granted: int
    remaining: int
    expires_at: datetime | None


class Audit(BaseModel):
    """Totals of one account's ledger, for checks and the admin CLI."""

    account_id: int
    ledger_total: int  # sum of all rows
    bucket_total: int  # remaining in buckets not yet expired
    granted: int  # daily grants, purchases, admin grants and pack transfers
    held: int  # reserved, not yet captured or released
    captured: int
    released: int
    expired: int
    refunded: int = 0  # what refunds took back from bought packs

    @property
    def balanced(self) -> bool:
        return self.ledger_total == self.bucket_total

    @property
    def conserved(self) -> bool:
        """Nothing made or lost: every granted credit is spendable, held, spent or expired."""
        return self.granted == (
            self.bucket_total + self.held + self.captured + self.expired + self.refunded
        )


# Public operations ----------------------------------------------------------------------------


def balance(
    *, session: Session, account_id: int, now: datetime, tiers: Mapping[str, Tier]
) -> Balance:
    """Bring the account up to date (expire due buckets, grant today's allowance) and report it.

    Most calls have nothing to bring up to date: they read the account and its live buckets
    without locking anything (no row lock is written, so a PostgreSQL commit has no WAL to
    flush). Only when a bucket is due or today's allowance is not granted yet does it take the
    account's and buckets' locks and write, as ``reserve`` does."""
    now = _utc(now)
    account = session.exec(
        select(Account).where(Account.id == account_id).execution_options(populate_existing=True)
    ).first()
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    buckets = _unexpired(session, account_id=account_id, lock=False)
    if not _needs_update(account, buckets, now=now, tiers=tiers):
        return _balance_from(account, buckets, now=now, tiers=tiers)
    account = _lock_account(session, account_id)
    live = _bring_up_to_date(
        session, account=account, buckets=_unexpired(session, account_id=account_id, lock=True),
        now=now, tiers=tiers,
    )
    return _balance_from(account, live, now=now, tiers=tiers)


def peek_balance(
    *, session: Session, account_id: int, now: datetime, tiers: Mapping[str, Tier]
) -> Balance:
    """``balance`` without writing: what a reservation now could take (today's allowance
    counted when it is not granted yet). For a price check before anything is posted."""
    now = _utc(now)
    account = session.get(Account, account_id)
    if account is None:
        raise NotFound(f"account {account_id} not found")
    bal = _balance_of(session, account=account, now=now, tiers=tiers)
    key = day_key(account_id, now.date())
    if account.merged_into_id is None and not session.exec(
        select(CreditBucket.id).where(CreditBucket.key == key)
    ).first():
        grant_now = _tier(tiers, account.tier).daily_allowance
        bal = bal.model_copy(
            update={"daily_left": bal.daily_left + grant_now, "total": bal.total + grant_now}
        )
    return bal


def reserve(
    *,
    session: Session,
    account_id: int,
    job_id: str,
    amount: int,
    now: datetime,
    tiers: Mapping[str, Tier],
) -> ReservationRead:
    """Hold ``amount`` credits for a job: today's allowance first, then packs soonest-expiring
    first. A second call for the same job returns the first reservation and charges nothing."""
    if amount < 1:
        raise InvalidRequest(f"a reservation must be at least 1 credit, got {amount}")
    _check_job_id(job_id)
    now = _utc(now)
    account = _lock_account(session, account_id)
    existing = _get_reservation(session, job_id)
    if existing is not None:
        if existing.amount != amount:
            raise Conflict(
                f"job {job_id} already holds a reservation of {existing.amount} credits, "
                f"not {amount}"
            )
        return _reservation_read(existing)
    if account.merged_into_id is not None:
        raise Conflict(
            f"account {account_id} was merged into account {account.merged_into_id}; use that one"
        )
    # One pass over the buckets: lock the live ones (in id order), expire the due among them,
    # add today's allowance if it is not there yet, and spend from the rest.
    buckets = _spend_order(_bring_up_to_date(
        session, account=account, buckets=_unexpired(session, account_id=account_id, lock=True),
        now=now, tiers=tiers,
    ))
    available = sum(b.remaining for b in buckets)
    if available < amount:
        raise InsufficientCredits(
            f"this needs {_credits(amount)}; you have {available}",
            needed=amount,
            available=available,
        )
    left = amount
    for bucket in buckets:
        take = min(bucket.remaining, left)
        if take == 0:
            continue
        _debit(session, bucket=bucket, amount=take)
        _write(
            session,
            account_id=_id(bucket.account_id),
            kind=CreditKind.reserve,
            bucket=bucket.key,
            amount=-take,
            job_id=job_id,
            key=f"reserve:{job_id}:{bucket.key}",
            expires_at=bucket.expires_at,
            now=now,
        )
        left -= take
        if left == 0:
            break
    reservation = Reservation(
        job_id=job_id,
        account_id=account_id,
        amount=amount,
        status=ReservationStatus.held,
        created_at=now,
        updated_at=now,
    )
    session.add(reservation)
    session.flush()
    return _reservation_read(reservation)


def capture(*, session: Session, job_id: str, now: datetime | None = None) -> ReservationRead:
    """Turn a job's hold into a charge. Idempotent; refused once the hold was released."""
    now = _utc(now or utcnow())
    reservation, changed = _settle(session, job_id=job_id, to=ReservationStatus.captured, now=now)
    if changed:
        _write(
            session,
            account_id=reservation.account_id,
            kind=CreditKind.capture,
            bucket="",
            amount=0,
            job_id=job_id,
            key=f"capture:{job_id}",
            now=now,
            note=f"captured {reservation.amount}",
        )
    return _reservation_read(reservation)


def release(*, session: Session, job_id: str, now: datetime | None = None) -> ReservationRead:
    """Give a job's held credits back to the buckets they came from. Idempotent; refused once
    captured. Credits whose pack (or day) expired meanwhile expire with it on the way back."""
    now = _utc(now or utcnow())
    reservation, changed = _settle(session, job_id=job_id, to=ReservationStatus.released, now=now)
    if not changed:
        return _reservation_read(reservation)
    taken = session.exec(
        select(CreditLedger)
        .where(CreditLedger.job_id == job_id, CreditLedger.kind == CreditKind.reserve)
        .order_by(col(CreditLedger.id))
    ).all()
    keys = [row.bucket for row in taken]
    buckets = {
        b.key: b
        for b in session.exec(
            select(CreditBucket)
            .where(col(CreditBucket.key).in_(keys))
            .order_by(col(CreditBucket.id))
            .with_for_update()
            .execution_options(populate_existing=True)
        ).all()
    }
    for row in taken:
        bucket = buckets[row.bucket]
        amount = -row.amount
        owner = _id(bucket.account_id)  # the bucket's owner now (a pack may have moved)
        _write(
            session,
            account_id=owner,
            kind=CreditKind.release,
            bucket=bucket.key,
            amount=amount,
            job_id=job_id,
            key=f"release:{job_id}:{bucket.key}",
            expires_at=bucket.expires_at,
            now=now,
        )
        expired = bucket.expired_at is not None or (
            bucket.expires_at is not None and bucket.expires_at <= now
        )
        if expired:
            _write(
                session,
                account_id=owner,
                kind=CreditKind.expire,
                bucket=bucket.key,
                amount=-amount,
                job_id=job_id,
                key=f"expire:{bucket.key}:{job_id}",
                now=now,
                note="released after its bucket expired",
            )
        else:
            session.exec(
                update(CreditBucket)
                .where(col(CreditBucket.id) == bucket.id)
                .values(remaining=CreditBucket.remaining + amount)
                .execution_options(synchronize_session=False)
            )
    session.flush()
    return _reservation_read(reservation)


def grant(
    *,
    session: Session,
    account_id: int,
    amount: int,
    key: str,
    expires_at: datetime | None = None,
    kind: CreditKind = CreditKind.purchase,
    now: datetime | None = None,
    note: str = "",
) -> BucketRead:
    """Add a pack of credits (a purchase or an operator's grant), idempotent by ``key`` (e.g. the
    payment id). ``expires_at=None`` never expires. The same key again returns the first pack."""
    if kind not in (CreditKind.purchase, CreditKind.admin):
        raise InvalidRequest(f"a pack grant is a purchase or admin grant, not {kind.value!r}")
    if amount < 1:
        raise InvalidRequest(f"a grant must be at least 1 credit, got {amount}")
    if not key or len(key) > 180:
        raise InvalidRequest(f"a grant key must be 1 to 180 characters, got {len(key)}")
    now = _utc(now or utcnow())
    if expires_at is not None:
        expires_at = _utc(expires_at)
        if expires_at <= now:
            raise InvalidRequest(f"expires_at must be in the future, got {expires_at.isoformat()}")
    account = _lock_account(session, account_id)
    bucket_key = f"pack:{key}"
    existing = session.exec(
        select(CreditBucket)
        .where(CreditBucket.key == bucket_key)
        .execution_options(populate_existing=True)
    ).first()
    if existing is None:
        if account.merged_into_id is not None:
            raise Conflict(
                f"account {account_id} was merged into account {account.merged_into_id}; "
                "grant to that one"
            )
        bucket = CreditBucket(
            account_id=account_id,
            kind=BucketKind.pack,
            key=bucket_key,
            granted=amount,
            remaining=amount,
            expires_at=expires_at,
            created_at=now,
        )
        try:
            with session.begin_nested():
                session.add(bucket)
                session.flush()
        except IntegrityError:
            # Another account's transaction took this key between our check and insert.
            raise Conflict(f"grant key {key!r} is already used by another account") from None
        _write(
            session,
            account_id=account_id,
            kind=kind,
            bucket=bucket_key,
            amount=amount,
            key=f"{bucket_key}:granted",
            expires_at=expires_at,
            now=now,
            note=note,
        )
        session.flush()
        return _bucket_read(bucket)
    # A retried grant may name the account this one was merged into since; that is the same.
    if existing.account_id not in (account_id, account.merged_into_id):
        raise Conflict(f"grant key {key!r} is already used by another account")
    if existing.granted != amount or existing.expires_at != expires_at:
        raise Conflict(
            f"grant key {key!r} was already used for {existing.granted} credits "
            f"expiring {existing.expires_at}"
        )
    return _bucket_read(existing)


def expire(*, session: Session, now: datetime) -> int:
    """Write expire rows for every bucket past its expiry; returns the credits expired."""
    now = _utc(now)
    due = session.exec(
        select(CreditBucket.account_id)
        .where(
            col(CreditBucket.expired_at).is_(None),
            col(CreditBucket.expires_at).is_not(None),
            col(CreditBucket.expires_at) <= now,
        )
        .distinct()
        .order_by(col(CreditBucket.account_id))
    ).all()
    total = 0
    for account_id in due:
        _lock_account(session, account_id, buckets=True)
        total += _expire_due(session, account_id=account_id, now=now)
    return total


def ledger_total(*, session: Session, account_id: int) -> int:
    total = session.exec(
        select(func.coalesce(func.sum(CreditLedger.amount), 0)).where(
            CreditLedger.account_id == account_id
        )
    ).one()
    return int(total)


def audit(*, session: Session, account_id: int) -> Audit:
    """Totals from the ledger, the buckets and the reservations of one account."""
    by_kind: dict[CreditKind, int] = {
        CreditKind(kind): int(total)
        for kind, total in session.exec(
            select(CreditLedger.kind, func.sum(CreditLedger.amount))
            .where(CreditLedger.account_id == account_id)
            .group_by(col(CreditLedger.kind))
        ).all()
    }
    bucket_total = session.exec(
        select(func.coalesce(func.sum(CreditBucket.remaining), 0)).where(
            CreditBucket.account_id == account_id, col(CreditBucket.expired_at).is_(None)
        )
    ).one()
    holds: dict[ReservationStatus, int] = {
        ReservationStatus(status): int(total)
        for status, total in session.exec(
            select(Reservation.status, func.sum(Reservation.amount))
            .where(Reservation.account_id == account_id)
            .group_by(col(Reservation.status))
        ).all()
    }
    return Audit(
        account_id=account_id,
        ledger_total=sum(by_kind.values()),
        bucket_total=int(bucket_total),
        granted=sum(by_kind.get(k, 0) for k in GRANT_KINDS),
        held=holds.get(ReservationStatus.held, 0),
        captured=holds.get(ReservationStatus.captured, 0),
        released=by_kind.get(CreditKind.release, 0),
        expired=-by_kind.get(CreditKind.expire, 0),
        refunded=-by_kind.get(CreditKind.refund, 0),
    )


def day_key(account_id: int, day: date) -> str:
    return f"daily:{account_id}:{day.isoformat()}"


def next_reset(now: datetime) -> datetime:
    """The next UTC midnight, when a new daily allowance becomes available."""
    return datetime.combine(_utc(now).date() + timedelta(days=1), time(0), tzinfo=UTC)


# Used by storage.accounts when two accounts are linked --------------------------------------


def lock_accounts(session: Session, account_ids: Sequence[int]) -> dict[int, Account]:
    """Lock several accounts in id order, then their buckets (PostgreSQL row locks; on SQLite the
    transaction already holds the database write lock)."""
    ids = sorted(set(account_ids))
    locked = {aid: _lock_account(session, aid) for aid in ids}
    _lock_buckets(session, ids)
    return locked


def merge_credits(session: Session, *, source_id: int, target_id: int, now: datetime) -> int:
    """Move ``source``'s live packs to ``target`` (an admin row out, one in) and expire its
    daily allowance: allowances do not add up by linking. Both accounts must be locked.
    Returns the pack credits moved. Holds of in-flight jobs stay with their buckets, so a later
    release refunds whoever owns the bucket then."""
    now = _utc(now)
    _expire_due(session, account_id=source_id, now=now)
    moved = 0
    for bucket in _live_buckets(session, account_id=source_id, now=now, lock=True):
        if bucket.kind == BucketKind.daily:
            if bucket.remaining:
                _write(
                    session,
                    account_id=source_id,
                    kind=CreditKind.expire,
                    bucket=bucket.key,
                    amount=-bucket.remaining,
                    key=f"expire:{bucket.key}",
                    expires_at=bucket.expires_at,
                    now=now,
                    note=f"daily allowance dropped when merged into account {target_id}",
                )
            bucket.remaining = 0
            bucket.expired_at = now
        else:
            if bucket.remaining:
                for account_id, amount, way in (
                    (source_id, -bucket.remaining, f"to account {target_id}"),
                    (target_id, bucket.remaining, f"from account {source_id}"),
                ):
                    _write(
                        session,
                        account_id=account_id,
                        kind=CreditKind.admin,
                        bucket=bucket.key,
                        amount=amount,
                        key=f"merge:{source_id}:{bucket.key}:{account_id}",
                        expires_at=bucket.expires_at,
                        now=now,
                        note=f"pack moved {way} by a link",
                    )
                moved += bucket.remaining
            bucket.account_id = target_id
        session.add(bucket)
    session.flush()
    return moved


# Internals -------------------------------------------------------------------------------------


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when.isoformat()} given; use an aware UTC datetime")
    return when.astimezone(UTC)


def _id(value: int | None) -> int:
    if value is None:
        raise RuntimeError("row has no id; was it flushed?")
    return value


def _credits(n: int) -> str:
    return f"{n} credit" if n == 1 else f"{n} credits"


def _check_job_id(job_id: str) -> None:
    if not job_id or len(job_id) > 64:
        raise InvalidRequest(f"a job id must be 1 to 64 characters, got {len(job_id)}")


def _tier(tiers: Mapping[str, Tier], name: str) -> Tier:
    try:
        return tiers[name]
    except KeyError:
        raise ConfigError(f"unknown tier {name!r}; known tiers: {sorted(tiers)}") from None


def _lock_account(session: Session, account_id: int, *, buckets: bool = False) -> Account:
    account = session.exec(
        select(Account)
        .where(Account.id == account_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    if buckets:
        _lock_buckets(session, [account_id])
    return account


def _lock_buckets(session: Session, account_ids: Sequence[int]) -> None:
    # All of them, in id order, before touching any: release locks the buckets of its split in
    # id order too, so two transactions can never wait on each other's bucket rows in a cycle.
    session.exec(
        select(CreditBucket.id)
        .where(
            col(CreditBucket.account_id).in_(account_ids), col(CreditBucket.expired_at).is_(None)
        )
        .order_by(col(CreditBucket.id))
        .with_for_update()
    ).all()


def _get_reservation(session: Session, job_id: str) -> Reservation | None:
    return session.exec(
        select(Reservation)
        .where(Reservation.job_id == job_id)
        .execution_options(populate_existing=True)
    ).first()


def _live_buckets(
    session: Session, *, account_id: int, now: datetime, lock: bool
) -> list[CreditBucket]:
    stmt = (
        select(CreditBucket)
        .where(
            CreditBucket.account_id == account_id,
            col(CreditBucket.expired_at).is_(None),
            or_(col(CreditBucket.expires_at).is_(None), col(CreditBucket.expires_at) > now),
        )
        .order_by(col(CreditBucket.id))
        .execution_options(populate_existing=True)
    )
    if lock:
        stmt = stmt.with_for_update()
    return list(session.exec(stmt).all())


def _spend_order(buckets: list[CreditBucket]) -> list[CreditBucket]:
    far = datetime.max.replace(tzinfo=UTC)

    def rank(b: CreditBucket) -> tuple[int, datetime, int]:
        return (0 if b.kind == BucketKind.daily else 1, b.expires_at or far, _id(b.id))

    return sorted(buckets, key=rank)


def _debit(session: Session, *, bucket: CreditBucket, amount: int) -> None:
    result = session.exec(
        update(CreditBucket)
        .where(col(CreditBucket.id) == bucket.id, col(CreditBucket.remaining) >= amount)
        .values(remaining=CreditBucket.remaining - amount)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        # Cannot happen while the account lock is held; refuse rather than overdraw.
        raise Conflict(f"credit bucket {bucket.key} changed under a reservation; try again")


def _ensure_daily(
    session: Session, *, account: Account, now: datetime, tiers: Mapping[str, Tier]
) -> CreditBucket | None:
    """Grant today's allowance on the first action of the UTC day (yesterday's has expired);
    returns the bucket it made, None when there was nothing to grant."""
    if account.merged_into_id is not None:
        return None
    allowance = _tier(tiers, account.tier).daily_allowance
    account_id = _id(account.id)
    key = day_key(account_id, now.date())
    if (
        allowance == 0
        or session.exec(select(CreditBucket.id).where(CreditBucket.key == key)).first()
    ):
        return None
    expires_at = next_reset(now)
    bucket = CreditBucket(
        account_id=account_id,
        kind=BucketKind.daily,
        key=key,
        granted=allowance,
        remaining=allowance,
        expires_at=expires_at,
        created_at=now,
    )
    session.add(bucket)
    _write(
        session,
        account_id=account_id,
        kind=CreditKind.grant,
        bucket=key,
        amount=allowance,
        key=f"{key}:granted",
        expires_at=expires_at,
        now=now,
        note=f"daily allowance of tier {account.tier}",
    )
    session.flush()
    return bucket


def _expire_due(session: Session, *, account_id: int, now: datetime) -> int:
    due = session.exec(
        select(CreditBucket)
        .where(
            CreditBucket.account_id == account_id,
            col(CreditBucket.expired_at).is_(None),
            col(CreditBucket.expires_at).is_not(None),
            col(CreditBucket.expires_at) <= now,
        )
        .order_by(col(CreditBucket.id))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    total = 0
    for bucket in due:
        if bucket.remaining:
            _write(
                session,
                account_id=account_id,
                kind=CreditKind.expire,
                bucket=bucket.key,
                amount=-bucket.remaining,
                key=f"expire:{bucket.key}",
                expires_at=bucket.expires_at,
                now=now,
            )
            total += bucket.remaining
        bucket.remaining = 0
        bucket.expired_at = now
        session.add(bucket)
    session.flush()
    return total


def _unexpired(session: Session, *, account_id: int, lock: bool) -> list[CreditBucket]:
    """The account's buckets not yet marked expired (some may be due), in id order: a range of
    ``ix_credit_buckets_live``. ``lock``: row locks, in id order like every bucket lock."""
    stmt = (
        select(CreditBucket)
        .where(CreditBucket.account_id == account_id, col(CreditBucket.expired_at).is_(None))
        .order_by(col(CreditBucket.id))
        .execution_options(populate_existing=True)
    )
    if lock:
        stmt = stmt.with_for_update()
    return list(session.exec(stmt).all())


def _due(bucket: CreditBucket, now: datetime) -> bool:
    return bucket.expires_at is not None and bucket.expires_at <= now


def _needs_update(
    account: Account, buckets: Sequence[CreditBucket], *, now: datetime,
    tiers: Mapping[str, Tier],
) -> bool:
    """Whether a bucket is due to expire or today's allowance is still to be granted."""
    if any(_due(b, now) for b in buckets):
        return True
    if account.merged_into_id is not None or _tier(tiers, account.tier).daily_allowance == 0:
        return False
    key = day_key(_id(account.id), now.date())
    return all(b.key != key for b in buckets)


def _bring_up_to_date(
    session: Session, *, account: Account, buckets: Sequence[CreditBucket], now: datetime,
    tiers: Mapping[str, Tier],
) -> list[CreditBucket]:
    """Given the account's locked unexpired buckets: expire the due ones, grant today's
    allowance if due; returns the live buckets (today's new one included)."""
    account_id = _id(account.id)
    live: list[CreditBucket] = []
    for bucket in buckets:
        if not _due(bucket, now):
            live.append(bucket)
            continue
        if bucket.remaining:
            _write(
                session,
                account_id=account_id,
                kind=CreditKind.expire,
                bucket=bucket.key,
                amount=-bucket.remaining,
                key=f"expire:{bucket.key}",
                expires_at=bucket.expires_at,
                now=now,
            )
        bucket.remaining = 0
        bucket.expired_at = now
        session.add(bucket)
    key = day_key(account_id, now.date())
    if all(b.key != key for b in live):
        made = _ensure_daily(session, account=account, now=now, tiers=tiers)
        if made is not None:
            live.append(made)
    session.flush()
    return live


def _balance_from(
    account: Account, buckets: Sequence[CreditBucket], *, now: datetime,
    tiers: Mapping[str, Tier],
) -> Balance:
    spendable = _spend_order([b for b in buckets if b.expired_at is None and not _due(b, now)])
    daily = sum(b.remaining for b in spendable if b.kind == BucketKind.daily)
    packs = [
        PackCredits(amount=b.remaining, expires_at=b.expires_at)
        for b in spendable
        if b.kind == BucketKind.pack and b.remaining > 0
    ]
    merged = account.merged_into_id is not None
    return Balance(
        daily_left=daily,
        daily_allowance=0 if merged else _tier(tiers, account.tier).daily_allowance,
        packs=packs,
        total=daily + sum(p.amount for p in packs),
        next_reset=next_reset(now),
    )


def _balance_of(
    session: Session, *, account: Account, now: datetime, tiers: Mapping[str, Tier]
) -> Balance:
    live = _live_buckets(session, account_id=_id(account.id), now=now, lock=False)
    return _balance_from(account, live, now=now, tiers=tiers)


def _settle(
    session: Session, *, job_id: str, to: ReservationStatus, now: datetime
) -> tuple[Reservation, bool]:
    """Move a held reservation to ``to``; returns it and whether this call made the change."""
    result = session.exec(
        update(Reservation)
        .where(col(Reservation.job_id) == job_id, col(Reservation.status) == ReservationStatus.held)
        .values(status=to, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    reservation = _get_reservation(session, job_id)
    if reservation is None:
        raise NotFound(f"job {job_id} has no credit reservation")
    if result.rowcount == 1:
        return reservation, True
    if reservation.status == to:
        return reservation, False
    verb = "capture" if to == ReservationStatus.captured else "release"
    raise Conflict(
        f"the credits of job {job_id} were already {reservation.status.value}; cannot {verb} them"
    )


def _write(
    session: Session,
    *,
    account_id: int,
    kind: CreditKind,
    bucket: str,
    amount: int,
    key: str,
    now: datetime,
    job_id: str | None = None,
    expires_at: datetime | None = None,
    note: str = "",
) -> None:
    session.add(
        CreditLedger(
            account_id=account_id,
            kind=kind,
            bucket=bucket,
            amount=amount,
            job_id=job_id,
            idempotency_key=key,
            expires_at=expires_at,
            created_at=now,
            note=note,
        )
    )


def _reservation_read(r: Reservation) -> ReservationRead:
    return ReservationRead.model_validate(r, from_attributes=True)


def _bucket_read(b: CreditBucket) -> BucketRead:
    return BucketRead.model_validate(b, from_attributes=True)
