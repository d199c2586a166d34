"""Retention: removes settled bookkeeping past its age (``atelier db prune``), so the store grows
with what people keep (their images, live packs), not with every job ever run.

What goes, older than ``keep``: failed and cancelled jobs (they have no images); settled
reservations (captured sums roll into one ``carry:{account}`` reservation, so audits still add
up); ledger rows not tied to a held reservation, rolled up per account and kind into one
``carry:{account}:{kind}`` row in the same transaction, so every account's ``sum(amount)``,
balance and audit stay exactly what they were; spent daily buckets; used or expired link
codes. Soft-deleted images go ``keep_deleted`` after their owner deleted them (their blobs were
removed at deletion), with their jobs once no image of theirs is left. Never touched: live images,
jobs in flight or with images, held reservations and their rows, pack buckets (a pack's key
keeps a retried payment from granting twice), live buckets.

Each call removes at most ``batch`` rows of each kind in the caller's transaction; ``atelier db
prune`` calls it in transactions of their own until nothing is left."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import bindparam, delete, insert, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from core.errors import InvalidRequest
from core.jobs import JobStatus
from storage.db import transaction
from storage.models import (
    BucketKind,
    CreditBucket,
    CreditKind,
    CreditLedger,
    Image,
    ImageStyle,
    Job,
    LinkCode,
    Reservation,
    ReservationStatus,
)

CARRY = "carry:"  # the key prefix of carried-forward ledger rows and reservations
SETTLED = (ReservationStatus.captured, ReservationStatus.released)
UNPAID_ENDS = (JobStatus.failed, JobStatus.cancelled)


class PruneReport(BaseModel):
    """Rows removed, per table (``carried``: ledger rows rolled up, part of ``ledger``)."""

    images: int = 0
    jobs: int = 0
    reservations: int = 0
    ledger: int = 0
    buckets: int = 0
    link_codes: int = 0

    @property
    def total(self) -> int:
        return (
            self.images + self.jobs + self.reservations + self.ledger + self.buckets
            + self.link_codes
        )

    def add(self, other: PruneReport) -> PruneReport:
        return PruneReport(
            **{k: getattr(self, k) + getattr(other, k) for k in PruneReport.model_fields}
        )


def prune(
    *,
    session: Session,
    now: datetime,
    keep: timedelta,
    keep_deleted: timedelta,
    batch: int = 5000,
    kinds: Collection[str] | None = None,
) -> PruneReport:
    """One batch of each kind (see the module docstring), or of ``kinds`` (names of
    PruneReport's fields) only; call again until ``total`` is 0."""
    if keep < timedelta(days=2):
        raise InvalidRequest(f"keep must be at least 2 days (deliveries retry for a day), "
                             f"got {keep}")
    if keep_deleted < timedelta(0):
        raise InvalidRequest(f"keep_deleted must not be negative, got {keep_deleted}")
    if not 1 <= batch <= 100_000:
        raise InvalidRequest(f"batch must be between 1 and 100000, got {batch}")
    unknown = set(kinds or ()) - set(PruneReport.model_fields)
    if unknown:
        raise InvalidRequest(f"unknown kinds to prune {sorted(unknown)}; "
                             f"known: {list(PruneReport.model_fields)}")
    cutoff = now - keep
    steps: dict[str, Callable[[], int]] = {
        "images": lambda: _deleted_images(session, before=now - keep_deleted, batch=batch),
        "jobs": lambda: _unpaid_jobs(session, before=cutoff, batch=batch),
        "reservations": lambda: _reservations(session, before=cutoff, now=now, batch=batch),
        "ledger": lambda: _ledger(session, before=cutoff, now=now, batch=batch),
        "buckets": lambda: _daily_buckets(session, before=cutoff, batch=batch),
        "link_codes": lambda: _link_codes(session, before=cutoff, batch=batch),
    }
    return PruneReport(**{k: step() for k, step in steps.items() if kinds is None or k in kinds})


def _deleted_images(session: Session, *, before: datetime, batch: int) -> int:
    rows = session.exec(
        select(Image.id, Image.job_id)
        .where(col(Image.deleted_at).is_not(None), col(Image.deleted_at) < before)
        .order_by(col(Image.deleted_at))
        .limit(batch)
    ).all()
    if not rows:
        return 0
    ids = [r[0] for r in rows]
    session.exec(delete(ImageStyle).where(col(ImageStyle.image_id).in_(ids)))
    session.exec(delete(Image).where(col(Image.id).in_(ids)))
    # Their jobs, once no image of theirs is left (the job row is the image's provenance).
    job_ids = sorted({r[1] for r in rows})
    left = select(Image.id).where(col(Image.job_id) == col(Job.id)).exists()
    session.exec(delete(Job).where(col(Job.id).in_(job_ids), ~left))
    return len(ids)


def _unpaid_jobs(session: Session, *, before: datetime, batch: int) -> int:
    has_images = select(Image.id).where(col(Image.job_id) == col(Job.id)).exists()
    ids = session.exec(
        select(Job.id)
        .where(col(Job.status).in_(UNPAID_ENDS), col(Job.created_at) < before, ~has_images)
        .limit(batch)
    ).all()
    if ids:
        session.exec(delete(Job).where(col(Job.id).in_(ids)))
    return len(ids)


def _reservations(session: Session, *, before: datetime, now: datetime, batch: int) -> int:
    rows = [  # one status at a time: a range of ix_reservations_status_updated each
        row
        for status in SETTLED
        for row in session.exec(
            select(Reservation.job_id, Reservation.account_id, Reservation.status,
                   Reservation.amount)
            .where(col(Reservation.status) == status, col(Reservation.updated_at) < before)
            .order_by(col(Reservation.updated_at))
            .limit(batch)
        ).all()
    ]
    if not rows:
        return 0
    captured: dict[int, int] = defaultdict(int)
    for _job, account_id, status, amount in rows:
        if status == ReservationStatus.captured:
            captured[account_id] += amount
    session.exec(delete(Reservation).where(col(Reservation.job_id).in_([r[0] for r in rows])))
    _carry(
        session, Reservation, col(Reservation.job_id),
        {f"{CARRY}{a}": (n, {"job_id": f"{CARRY}{a}", "account_id": a, "amount": n,
                             "status": ReservationStatus.captured, "created_at": now,
                             "updated_at": now})
         for a, n in captured.items()},
    )
    return len(rows)


def _ledger(session: Session, *, before: datetime, now: datetime, batch: int) -> int:
    held = (
        select(Reservation.job_id)
        .where(col(Reservation.job_id) == col(CreditLedger.job_id),
               col(Reservation.status) == ReservationStatus.held)
        .exists()
    )
    rows = session.exec(
        select(CreditLedger.id, CreditLedger.account_id, CreditLedger.kind, CreditLedger.amount)
        .where(col(CreditLedger.created_at) < before,
               col(CreditLedger.job_id).is_(None) | ~held)
        .order_by(col(CreditLedger.created_at))
        .limit(batch)
    ).all()
    if not rows:
        return 0
    sums: dict[tuple[int, CreditKind], int] = defaultdict(int)
    for _id, account_id, kind, amount in rows:
        sums[(account_id, CreditKind(kind))] += amount
    session.exec(delete(CreditLedger).where(col(CreditLedger.id).in_([r[0] for r in rows])))
    # A carry row among the rows just removed is folded into the one written now.
    _carry(
        session, CreditLedger, col(CreditLedger.idempotency_key),
        {f"{CARRY}{a}:{k.value}": (n, {
            "account_id": a, "kind": k, "bucket": "", "amount": n, "job_id": None,
            "idempotency_key": f"{CARRY}{a}:{k.value}", "expires_at": None, "created_at": now,
            "note": f"carried forward: {k.value} rows before {before.date().isoformat()}",
        }) for (a, k), n in sums.items()},
    )
    return len(rows)


def _carry(
    session: Session, table: Any, key_col: Any, carried: dict[str, tuple[int, dict[str, Any]]]
) -> None:
    """Add each amount to the carry row of its key, or insert the row: one statement each."""
    found = set(session.exec(select(key_col).where(key_col.in_(sorted(carried)))).all())
    if found:
        session.connection().execute(
            update(table)
            .where(key_col == bindparam("carry_key"))
            .values(amount=table.amount + bindparam("add")),
            [{"carry_key": k, "add": carried[k][0]} for k in sorted(found)],
        )
    new = [row for k, (_n, row) in sorted(carried.items()) if k not in found]
    if new:
        session.connection().execute(insert(table), new)


def _daily_buckets(session: Session, *, before: datetime, batch: int) -> int:
    # A bucket a held reservation took from stays: its release gives the credits back there.
    # (The held jobs first, then their rows by job id: the queue is short, the ledger long.)
    # Only holds made before ``before`` can have taken from a bucket that expired before it,
    # and a held reservation's updated_at is its created_at (only settling changes it): so a
    # range of ix_reservations_status_updated, nearly always empty, not the whole queue.
    held = session.exec(
        select(Reservation.job_id).where(
            col(Reservation.status) == ReservationStatus.held,
            col(Reservation.updated_at) < before,
        )
    ).all()
    held_keys = sorted({
        key
        for start in range(0, len(held), 1000)
        for key in session.exec(
            select(CreditLedger.bucket).where(
                col(CreditLedger.job_id).in_(held[start:start + 1000]),
                col(CreditLedger.kind) == CreditKind.reserve,
            )
        ).all()
    })
    stmt = select(CreditBucket.id).where(
        col(CreditBucket.expired_at).is_not(None), col(CreditBucket.expired_at) < before,
        col(CreditBucket.kind) == BucketKind.daily,
    )
    if held_keys:
        stmt = stmt.where(col(CreditBucket.key).not_in(held_keys))
    ids = session.exec(stmt.order_by(col(CreditBucket.expired_at)).limit(batch)).all()
    if ids:
        session.exec(delete(CreditBucket).where(col(CreditBucket.id).in_(ids)))
    return len(ids)


def _link_codes(session: Session, *, before: datetime, batch: int) -> int:
    codes = session.exec(
        select(LinkCode.code).where(col(LinkCode.expires_at) < before).limit(batch)
    ).all()
    if codes:
        session.exec(delete(LinkCode).where(col(LinkCode.code).in_(codes)))
    return len(codes)


def prune_all(
    sessions: sessionmaker[Session],
    *,
    now: datetime,
    keep: timedelta,
    keep_deleted: timedelta,
    batch: int = 5000,
) -> PruneReport:
    """``prune`` in a transaction per batch until a batch removes nothing; the totals."""
    report = PruneReport()
    while True:
        with transaction(sessions) as session:
            step = prune(
                session=session, now=now, keep=keep, keep_deleted=keep_deleted, batch=batch
            )
        report = report.add(step)
        if step.total == 0:
            return report
