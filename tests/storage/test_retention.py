"""Retention: a prune removes settled bookkeeping past its age and never changes a balance,
an audit, a live pack, a held reservation or a live image."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select

from core.errors import InvalidRequest
from core.jobs import DeliveryTarget, JobStatus
from core.request import GenerationRequest
from core.settings import Tier
from storage import gallery, jobs, ledger, retention
from storage.accounts import AccountRead
from storage.models import CreditBucket, CreditLedger, Image, ImageStyle, Job, Reservation

Tx = Callable[[], AbstractContextManager[Session]]
KEEP = timedelta(days=90)


def _job(tx: Tx, account: AccountRead, at: datetime, tiers: dict[str, Tier], end: str) -> str:
    """A one-credit job asked at ``at`` and ended as ``end``: captured (with an image),
    released (failed), or held (still queued)."""
    with tx() as s:
        job, _ = jobs.create_job(
            session=s, idempotency_key=uuid.uuid4().hex, account_id=account.id,
            identity_id=None, request=GenerationRequest(prompt="a fox"),
            delivery=DeliveryTarget(frontend="web"), cost=1, now=at,
        )
        ledger.reserve(session=s, account_id=account.id, job_id=job.id, amount=1, now=at,
                       tiers=tiers)
        if end == "captured":
            jobs.set_status(session=s, job_id=job.id, status=JobStatus.running, now=at)
            jobs.set_status(session=s, job_id=job.id, status=JobStatus.succeeded, now=at)
            gallery.add_images(session=s, job_id=job.id, now=at, images=[gallery.NewImage(
                index=0, seed=1, width=64, height=64, blob_key=f"b/{job.id}", sha256="0" * 64,
                prompt="a fox", styles=("anime",),
            )])
            ledger.capture(session=s, job_id=job.id, now=at)
        elif end == "released":
            jobs.set_status(session=s, job_id=job.id, status=JobStatus.failed, now=at)
            ledger.release(session=s, job_id=job.id, now=at)
    return job.id


def _state(tx: Tx, account_id: int, now: datetime, tiers: dict[str, Tier]) -> tuple[object, ...]:
    with tx() as s:
        return (
            ledger.ledger_total(session=s, account_id=account_id),
            ledger.audit(session=s, account_id=account_id),
            ledger.peek_balance(session=s, account_id=account_id, now=now, tiers=tiers),
        )


def _count(tx: Tx, table: type) -> int:
    with tx() as s:
        return int(s.exec(select(func.count()).select_from(table)).one())


def test_prune_keeps_every_balance_and_removes_old_bookkeeping(
    tx: Tx, factory: sessionmaker[Session], new_account: Callable[..., AccountRead],
    now: datetime, tiers: dict[str, Tier],
) -> None:
    acct, other = new_account(), new_account("pro")
    start = now - timedelta(days=200)
    with tx() as s:  # a pack that lives on, and one that expired long ago
        ledger.grant(session=s, account_id=acct.id, amount=50, key="live", now=start,
                     expires_at=now + timedelta(days=30))
        ledger.grant(session=s, account_id=acct.id, amount=7, key="gone", now=start,
                     expires_at=start + timedelta(days=10))
    ends = ["captured", "released", "captured"]
    for day in range(0, 200, 10):  # 20 days of use, most of them past retention
        for n, end in enumerate(ends):
            _job(tx, acct, start + timedelta(days=day, minutes=n), tiers, end)
        _job(tx, other, start + timedelta(days=day), tiers, "captured")
    held = _job(tx, acct, start + timedelta(days=1), tiers, "held")  # stuck since day 1
    with tx() as s:
        deleted = gallery.list_images(session=s, account_id=acct.id, limit=100).items[-1]
        gallery.soft_delete(session=s, image_id=deleted.id, account_id=acct.id,
                            now=start + timedelta(days=2))
    with tx() as s:
        ledger.expire(session=s, now=now)
    before = {a.id: _state(tx, a.id, now, tiers) for a in (acct, other)}
    rows_before = _count(tx, CreditLedger)
    images_before = _count(tx, Image)

    report = retention.prune_all(factory, now=now, keep=KEEP, keep_deleted=timedelta(days=30),
                                 batch=7)  # small batches: carry rows fold into each other

    assert {a.id: _state(tx, a.id, now, tiers) for a in (acct, other)} == before
    assert report.ledger > 0 and report.reservations > 0 and report.jobs > 0
    assert report.buckets > 0 and report.images == 1
    assert _count(tx, CreditLedger) < rows_before / 2
    assert _count(tx, Image) == images_before - 1
    with tx() as s:
        # The stuck job's hold, its reserve rows and the buckets they came from are all there.
        assert s.get(Reservation, held) is not None
        assert s.exec(select(CreditLedger).where(CreditLedger.job_id == held)).all()
        assert s.exec(select(CreditBucket).where(CreditBucket.key == "pack:live")).one()
        assert s.get(Image, deleted.id) is None
        assert not s.exec(select(ImageStyle).where(ImageStyle.image_id == deleted.id)).all()
        assert s.get(Job, deleted.job_id) is None  # its only image is gone
        old_failed = s.exec(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.failed, col(Job.created_at) < now - KEEP)).one()
        assert old_failed == 0
        assert len(gallery.list_images(session=s, account_id=acct.id, limit=100).items) == 39

    # A later prune folds the carried rows again; releasing the old hold still refunds it.
    later = now + timedelta(days=100)
    retention.prune_all(factory, now=later, keep=KEEP, keep_deleted=timedelta(days=30))
    assert {a.id: _state(tx, a.id, now, tiers) for a in (acct, other)} == before
    with tx() as s:
        ledger.release(session=s, job_id=held, now=now)
    audit = _state(tx, acct.id, now, tiers)[1]
    assert isinstance(audit, ledger.Audit) and audit.balanced and audit.conserved
    assert audit.ledger_total == before[acct.id][0]  # released into an expired bucket: expired


def test_prune_refuses_a_retention_shorter_than_delivery_retries(
    tx: Tx, now: datetime
) -> None:
    with tx() as s, pytest.raises(InvalidRequest, match="keep must be at least 2 days"):
        retention.prune(session=s, now=now, keep=timedelta(hours=12),
                        keep_deleted=timedelta(days=1))
