"""Many simultaneous reserves on one account: no overdraft, no lost credit, on both databases."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy import Engine, func
from sqlmodel import Session, select

from core.errors import InsufficientCredits
from core.settings import Tier
from storage import accounts, ledger
from storage.db import session_factory, transaction
from storage.models import CreditBucket

Tx = Callable[[], AbstractContextManager[Session]]

THREADS = 200


def test_200_concurrent_reserves_on_credit_for_5(
    engine: Engine,
    tx: Tx,
    new_account: Callable[..., accounts.AccountRead],
    tiers: dict[str, Tier],
    now: datetime,
) -> None:
    acct = new_account()  # 3 a day
    with tx() as s:
        ledger.grant(session=s, account_id=acct.id, amount=2, key="two", now=now)
        assert ledger.balance(session=s, account_id=acct.id, now=now, tiers=tiers).total == 5

    factory = session_factory(engine)
    readers = session_factory(engine, read_only=True)
    start = threading.Barrier(min(THREADS, 32) + 1)
    done = threading.Event()
    lowest: list[int] = []

    def watch() -> None:
        # Samples the buckets while the reserves run: no bucket may ever go below zero.
        while not done.is_set():
            with readers() as s:
                low = s.exec(
                    select(func.min(CreditBucket.remaining)).where(
                        CreditBucket.account_id == acct.id
                    )
                ).one()
                lowest.append(int(low))
            time.sleep(0.002)  # sample, do not starve the writers of the GIL

    def attempt(i: int) -> str:
        if i < 32:
            start.wait()
        try:
            with transaction(factory) as s:
                ledger.reserve(
                    session=s, account_id=acct.id, job_id=f"job-{i}", amount=1, now=now, tiers=tiers
                )
            return "ok"
        except InsufficientCredits:
            return "short"

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(attempt, i) for i in range(THREADS)]
            start.wait()
            outcomes = [f.result() for f in futures]
    finally:
        done.set()
        watcher.join()

    assert outcomes.count("ok") == 5
    assert outcomes.count("short") == THREADS - 5
    assert lowest and min(lowest) >= 0
    with tx() as s:
        bal = ledger.balance(session=s, account_id=acct.id, now=now, tiers=tiers)
        audit = ledger.audit(session=s, account_id=acct.id)
        total = ledger.ledger_total(session=s, account_id=acct.id)
    assert bal.total == 0 == total
    assert audit.balanced and audit.conserved
    assert (audit.granted, audit.held) == (5, 5)
