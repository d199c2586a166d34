"""Credit ledger: daily allowance, packs, reserve / capture / release, expiry, idempotency."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import Session, col, select

from core.errors import Conflict, InsufficientCredits, InvalidRequest, NotFound
from core.settings import Tier
from storage import ledger
from storage.accounts import AccountRead
from storage.models import CreditKind, CreditLedger, ReservationStatus

Tx = Callable[[], AbstractContextManager[Session]]
NewAccount = Callable[..., AccountRead]


def _balance(tx: Tx, account_id: int, now: datetime, tiers: dict[str, Tier]) -> ledger.Balance:
    with tx() as s:
        return ledger.balance(session=s, account_id=account_id, now=now, tiers=tiers)


def _audit(tx: Tx, account_id: int) -> ledger.Audit:
    with tx() as s:
        return ledger.audit(session=s, account_id=account_id)


def test_daily_allowance_is_granted_lazily_and_does_not_accumulate(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    bal = _balance(tx, acct.id, now, tiers)
    assert (bal.daily_left, bal.daily_allowance, bal.total) == (3, 3, 3)
    assert bal.next_reset == datetime(2026, 3, 3, tzinfo=UTC)
    assert _balance(tx, acct.id, now + timedelta(hours=1), tiers).total == 3  # granted once

    # Three days later: still 3, not 12; the old days' buckets expired at their midnights.
    later = now + timedelta(days=3)
    assert _balance(tx, acct.id, later, tiers).total == 3
    audit = _audit(tx, acct.id)
    assert audit.granted == 6 and audit.expired == 3 and audit.balanced and audit.conserved
    with tx() as s:
        keys = s.exec(select(CreditLedger.idempotency_key).order_by(col(CreditLedger.id))).all()
    assert f"daily:{acct.id}:2026-03-02:granted" in keys
    assert f"expire:daily:{acct.id}:2026-03-02" in keys


def test_reserve_spends_daily_first_then_soonest_expiring_pack(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    with tx() as s:
        ledger.grant(session=s, account_id=acct.id, amount=5, key="late", now=now)  # no expiry
        ledger.grant(
            session=s,
            account_id=acct.id,
            amount=4,
            key="soon",
            expires_at=now + timedelta(days=2),
            now=now,
        )
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="j1", amount=5, now=now, tiers=tiers)
        rows = s.exec(
            select(CreditLedger.bucket, CreditLedger.amount)
            .where(CreditLedger.job_id == "j1")
            .order_by(col(CreditLedger.id))
        ).all()
    assert [tuple(r) for r in rows] == [(f"daily:{acct.id}:2026-03-02", -3), ("pack:soon", -2)]
    bal = _balance(tx, acct.id, now, tiers)
    assert bal.daily_left == 0
    assert [(p.amount, p.expires_at) for p in bal.packs] == [
        (2, now + timedelta(days=2)),
        (5, None),
    ]
    assert bal.total == 7


def test_insufficient_credits_message(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier]
) -> None:
    acct = new_account()
    evening = datetime(2026, 3, 2, 18, 48, tzinfo=UTC)
    with tx() as s:
        ledger.reserve(
            session=s, account_id=acct.id, job_id="a", amount=1, now=evening, tiers=tiers
        )
    with pytest.raises(InsufficientCredits) as err, tx() as s:
        ledger.reserve(
            session=s, account_id=acct.id, job_id="b", amount=4, now=evening, tiers=tiers
        )
    assert err.value.message == "this needs 4 credits; you have 2"
    assert (err.value.needed, err.value.available) == (4, 2)
    with tx() as s:
        ledger.grant(session=s, account_id=acct.id, amount=1, key="p", now=evening)
    with pytest.raises(InsufficientCredits, match="^this needs 4 credits; you have 3$"), tx() as s:
        ledger.reserve(
            session=s, account_id=acct.id, job_id="b", amount=4, now=evening, tiers=tiers
        )
    assert _balance(tx, acct.id, evening, tiers).total == 3  # the refusal charged nothing


def test_reserve_capture_release_are_idempotent(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    for _ in range(2):
        with tx() as s:
            r = ledger.reserve(
                session=s, account_id=acct.id, job_id="job-1", amount=2, now=now, tiers=tiers
            )
        assert (r.status, r.amount) == (ReservationStatus.held, 2)
        assert _balance(tx, acct.id, now, tiers).total == 1
    for _ in range(2):
        with tx() as s:
            assert ledger.capture(session=s, job_id="job-1", now=now).status == "captured"
    assert _balance(tx, acct.id, now, tiers).total == 1
    with pytest.raises(Conflict, match="already captured; cannot release"), tx() as s:
        ledger.release(session=s, job_id="job-1", now=now)

    with tx() as s:
        ledger.reserve(
            session=s, account_id=acct.id, job_id="job-2", amount=1, now=now, tiers=tiers
        )
    for _ in range(2):
        with tx() as s:
            assert ledger.release(session=s, job_id="job-2", now=now).status == "released"
        assert _balance(tx, acct.id, now, tiers).total == 1
    with pytest.raises(Conflict, match="already released; cannot capture"), tx() as s:
        ledger.capture(session=s, job_id="job-2", now=now)
    # A released job's id stays spent: reserving it again returns the old reservation.
    with tx() as s:
        again = ledger.reserve(
            session=s, account_id=acct.id, job_id="job-2", amount=1, now=now, tiers=tiers
        )
    assert again.status == ReservationStatus.released
    assert _balance(tx, acct.id, now, tiers).total == 1

    audit = _audit(tx, acct.id)
    assert (audit.held, audit.captured, audit.released) == (0, 2, 1)
    assert audit.balanced and audit.conserved
    with tx() as s:
        kinds = s.exec(select(CreditLedger.kind).where(CreditLedger.job_id == "job-1")).all()
    assert sorted(kinds) == [CreditKind.capture, CreditKind.reserve]


def test_reserve_with_another_amount_and_unknown_jobs_are_refused(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="j", amount=1, now=now, tiers=tiers)
    with (
        pytest.raises(Conflict, match="already holds a reservation of 1 credits, not 2"),
        tx() as s,
    ):
        ledger.reserve(session=s, account_id=acct.id, job_id="j", amount=2, now=now, tiers=tiers)
    with pytest.raises(NotFound, match="job nope has no credit reservation"), tx() as s:
        ledger.capture(session=s, job_id="nope")
    with pytest.raises(NotFound), tx() as s:
        ledger.reserve(session=s, account_id=999_999, job_id="x", amount=1, now=now, tiers=tiers)
    with pytest.raises(InvalidRequest), tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="y", amount=0, now=now, tiers=tiers)


def test_release_after_the_pack_expired_expires_the_released_part(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account("packs-only")
    with tx() as s:
        ledger.grant(
            session=s,
            account_id=acct.id,
            amount=5,
            key="short",
            expires_at=now + timedelta(hours=1),
            now=now,
        )
        ledger.reserve(session=s, account_id=acct.id, job_id="slow", amount=4, now=now, tiers=tiers)
    later = now + timedelta(hours=2)
    with tx() as s:
        assert ledger.expire(session=s, now=later) == 1  # the 1 credit left in the pack
        assert ledger.expire(session=s, now=later) == 0
    with tx() as s:
        ledger.release(session=s, job_id="slow", now=later)
    assert _balance(tx, acct.id, later, tiers).total == 0
    audit = _audit(tx, acct.id)
    assert (audit.granted, audit.expired, audit.released, audit.bucket_total) == (5, 5, 4, 0)
    assert audit.balanced and audit.conserved


def test_release_of_yesterdays_daily_credits_lapses(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="j", amount=2, now=now, tiers=tiers)
    tomorrow = now + timedelta(days=1)
    with tx() as s:  # released before any sweep ran: still treated as expired
        ledger.release(session=s, job_id="j", now=tomorrow)
    assert _balance(tx, acct.id, tomorrow, tiers).total == 3
    audit = _audit(tx, acct.id)
    assert audit.balanced and audit.conserved and audit.expired == 3


def test_grant_is_idempotent_by_key(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    a, b = new_account(), new_account()
    for _ in range(2):
        with tx() as s:
            pack = ledger.grant(
                session=s,
                account_id=a.id,
                amount=10,
                key="stripe:pi_123",
                kind=CreditKind.admin,
                now=now,
            )
        assert (pack.remaining, pack.key) == (10, "pack:stripe:pi_123")
    assert _balance(tx, a.id, now, tiers).total == 13
    with pytest.raises(Conflict), tx() as s:
        ledger.grant(session=s, account_id=a.id, amount=11, key="stripe:pi_123", now=now)
    with pytest.raises(Conflict), tx() as s:
        ledger.grant(session=s, account_id=b.id, amount=10, key="stripe:pi_123", now=now)
    with pytest.raises(InvalidRequest), tx() as s:
        ledger.grant(session=s, account_id=a.id, amount=1, key="k", kind=CreditKind.grant)
    with pytest.raises(InvalidRequest, match="in the future"), tx() as s:
        ledger.grant(session=s, account_id=a.id, amount=1, key="k", expires_at=now, now=now)


def test_tier_without_allowance_and_unknown_tier(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account("packs-only")
    bal = _balance(tx, acct.id, now, tiers)
    assert bal.total == 0 and bal.daily_allowance == 0
    with (
        pytest.raises(InsufficientCredits, match="^this needs 1 credit; you have 0$"),
        tx() as s,
    ):
        ledger.reserve(session=s, account_id=acct.id, job_id="j", amount=1, now=now, tiers=tiers)
    odd = new_account("gone")
    with pytest.raises(Exception, match="unknown tier 'gone'"), tx() as s:
        ledger.balance(session=s, account_id=odd.id, now=now, tiers=tiers)


def test_naive_clock_is_refused(tx: Tx, new_account: NewAccount, tiers: dict[str, Tier]) -> None:
    acct = new_account()
    with pytest.raises(ValueError, match="naive datetime"), tx() as s:
        ledger.balance(session=s, account_id=acct.id, now=datetime(2026, 1, 1), tiers=tiers)
