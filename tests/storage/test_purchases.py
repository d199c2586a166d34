"""Purchases: a payment credits once, refunds take back what is left (never more), subscriptions
set a tier that drops at period end, linked accounts share what was bought, ledger sums hold."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlmodel import Session, select

from core.errors import NotFound
from core.settings import Tier
from storage import accounts, ledger, purchases
from storage.accounts import AccountRead
from storage.models import CreditBucket, CreditKind, CreditLedger, PurchaseStatus

Tx = Callable[[], AbstractContextManager[Session]]
NewAccount = Callable[..., AccountRead]


def _pack(tx: Tx, acct: AccountRead, charge: str, now: datetime, credits: int = 10) -> bool:
    with tx() as s:
        got = purchases.record_pack(
            session=s, account_id=acct.id, platform="telegram", platform_user_id="1",
            charge_id=charge, product="small", credits=credits,
            expires_at=now + timedelta(days=30), now=now,
        )
    return got.created


def _total(tx: Tx, account_id: int, now: datetime, tiers: dict[str, Tier]) -> int:
    with tx() as s:
        return ledger.balance(session=s, account_id=account_id, now=now, tiers=tiers).total


def _check_sums(tx: Tx, account_id: int) -> ledger.Audit:
    with tx() as s:
        audit = ledger.audit(session=s, account_id=account_id)
    assert audit.balanced and audit.conserved, audit
    return audit


def test_a_payment_seen_twice_credits_once(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    assert _pack(tx, acct, "ch-1", now) is True
    assert _pack(tx, acct, "ch-1", now + timedelta(minutes=1)) is False
    assert _total(tx, acct.id, now, tiers) == 3 + 10
    with tx() as s:
        bought = purchases.list_purchases(session=s, account_id=acct.id)
        rows = s.exec(select(CreditLedger).where(CreditLedger.kind == CreditKind.purchase)).all()
    assert [(p.key, p.credits, p.status) for p in bought] == [
        ("telegram:ch-1", 10, PurchaseStatus.paid)
    ]
    assert len(rows) == 1 and rows[0].bucket == "pack:telegram:ch-1"
    assert _check_sums(tx, acct.id).granted == 13


def test_refund_after_partial_spend_takes_back_only_what_is_left(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account("packs-only")
    _pack(tx, acct, "ch-2", now)
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="j1", amount=4, now=now, tiers=tiers)
        ledger.capture(session=s, job_id="j1", now=now)
    with tx() as s:
        got = purchases.refund(session=s, key="telegram:ch-2", now=now + timedelta(hours=1))
    assert (got.status, got.clawed_back, got.owed) == (PurchaseStatus.refunded, 6, 4)
    assert _total(tx, acct.id, now + timedelta(hours=2), tiers) == 0
    # Again: nothing more is taken, the record stays the same.
    with tx() as s:
        again = purchases.refund(session=s, key="telegram:ch-2", now=now + timedelta(hours=3))
    assert (again.clawed_back, again.owed) == (6, 4)
    audit = _check_sums(tx, acct.id)
    assert (audit.granted, audit.captured, audit.refunded, audit.bucket_total) == (10, 4, 6, 0)
    # The payment was already seen: paying the same charge again grants nothing.
    assert _pack(tx, acct, "ch-2", now + timedelta(hours=4)) is False
    assert _total(tx, acct.id, now + timedelta(hours=4), tiers) == 0


def test_refund_with_write_off_owes_nothing(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account("packs-only")
    _pack(tx, acct, "ch-3", now)
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id="j2", amount=3, now=now, tiers=tiers)
    with tx() as s:
        got = purchases.refund(session=s, key="telegram:ch-3", now=now, write_off=True)
    assert (got.clawed_back, got.owed) == (7, 0)
    # The job fails later: its held credits come back to a refunded pack and expire with it.
    with tx() as s:
        ledger.release(session=s, job_id="j2", now=now + timedelta(minutes=5))
    assert _total(tx, acct.id, now + timedelta(minutes=6), tiers) == 0
    _check_sums(tx, acct.id)


def test_unknown_refund_is_refused(tx: Tx) -> None:
    with tx() as s, pytest.raises(NotFound, match="no purchase 'telegram:nope'"):
        purchases.refund(session=s, key="telegram:nope", now=datetime.now().astimezone())


def test_subscription_sets_the_tier_and_lapses_at_period_end(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    acct = new_account()
    end = now + timedelta(days=30)
    with tx() as s:
        got = purchases.record_subscription(
            session=s, account_id=acct.id, platform="discord", platform_user_id="7",
            charge_id="ent-1", product="sub", tier="pro", period_end=end,
            known_tiers=tiers, now=now,
        )
    assert got.created
    with tx() as s:
        assert accounts.get_account(session=s, account_id=acct.id).tier == "pro"
        assert purchases.lapse_due(
            session=s, now=end - timedelta(seconds=1), default_tier="free", known_tiers=tiers
        ) == []
    assert _total(tx, acct.id, now + timedelta(days=1), tiers) == 20  # pro's allowance
    with tx() as s:
        dropped = purchases.lapse_due(session=s, now=end, default_tier="free", known_tiers=tiers)
        assert dropped == [acct.id]
        assert accounts.get_account(session=s, account_id=acct.id).tier == "free"
        sub = purchases.get_purchase(session=s, key="discord:ent-1")
    assert sub.status == PurchaseStatus.ended


def test_linked_accounts_share_what_either_bought(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    tg, dc = new_account(platform="telegram"), new_account(platform="discord")
    _pack(tx, dc, "ch-4", now, credits=25)
    with tx() as s:
        code = accounts.create_link_code(
            session=s, identity_id=_identity(tg), now=now, ttl=timedelta(minutes=10)
        )
    with tx() as s:
        accounts.redeem_link_code(session=s, code=code.code, identity_id=_identity(dc), now=now)
    # The pack moved to the joined account; a purchase made now through the merged account's
    # id lands there too, and both show in its list.
    _pack(tx, dc, "ch-5", now, credits=5)
    with tx() as s:
        listed = [p.key for p in purchases.list_purchases(session=s, account_id=tg.id)]
        owners = {b.key: b.account_id for b in s.exec(select(CreditBucket)).all()}
    assert listed == ["telegram:ch-5", "telegram:ch-4"] or set(listed) == {
        "telegram:ch-4", "telegram:ch-5"
    }
    assert owners["pack:telegram:ch-4"] == owners["pack:telegram:ch-5"] == tg.id
    assert _total(tx, tg.id, now, tiers) == 3 + 25 + 5
    # A refund of the moved pack takes it from the joined account.
    with tx() as s:
        purchases.refund(session=s, key="telegram:ch-4", now=now)
    assert _total(tx, tg.id, now, tiers) == 3 + 5
    _check_sums(tx, tg.id)


def _identity(acct: AccountRead) -> int:
    assert acct.identity is not None
    return acct.identity.id


def test_a_refund_before_its_payment_is_recorded_and_the_payment_credits_nothing(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    from storage.models import PurchaseKind

    acct = new_account()
    # Nobody named: a refund of an unknown charge stays unknown.
    with tx() as s, pytest.raises(NotFound):
        purchases.refund_once(session=s, key="telegram:early", now=now)
    payer = purchases.Payer(acct.id, "telegram", "1", PurchaseKind.pack, "small")
    with tx() as s:
        first = purchases.refund_once(session=s, key="telegram:early", now=now, payer=payer)
    with tx() as s:
        again = purchases.refund_once(session=s, key="telegram:early", now=now, payer=payer)
    assert first.created and not again.created
    assert (first.purchase.status, first.purchase.credits) == (PurchaseStatus.refunded, 0)
    assert _pack(tx, acct, "early", now) is False  # the late payment: nothing credited
    assert _total(tx, acct.id, now, tiers) == 3
    with tx() as s:
        rows = s.exec(select(CreditLedger).where(CreditLedger.kind == CreditKind.purchase)).all()
    assert rows == []
    _check_sums(tx, acct.id)


def test_payments_and_refunds_of_one_charge_at_once_credit_once(
    tx: Tx, new_account: NewAccount, tiers: dict[str, Tier], now: datetime
) -> None:
    """Duplicated and reordered deliveries of one payment and its refund, in threads at once
    (real row locks on PostgreSQL): credited once, taken back once, sums hold."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.models import PurchaseKind

    acct = new_account()
    payer = purchases.Payer(acct.id, "telegram", "1", PurchaseKind.pack, "small")

    def pay() -> None:
        _pack(tx, acct, "race", now)

    def refund() -> None:
        with tx() as s:
            purchases.refund_once(session=s, key="telegram:race", now=now, payer=payer)

    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            for f in [pool.submit(fn) for fn in (pay, refund, pay, refund, pay, pay)]:
                f.result()
    with tx() as s:
        bought = purchases.get_purchase(session=s, key="telegram:race")
        grants = s.exec(select(CreditLedger).where(CreditLedger.kind == CreditKind.purchase)).all()
        takes = s.exec(select(CreditLedger).where(CreditLedger.kind == CreditKind.refund)).all()
    assert bought.status == PurchaseStatus.refunded
    assert len(grants) <= 1 and len(takes) == len(grants)
    assert bought.clawed_back == (10 if grants else 0) and bought.owed == 0
    assert _total(tx, acct.id, now, tiers) == 3
    _check_sums(tx, acct.id)
