"""Hot-path plans on PostgreSQL: with a store big enough (and ANALYZEd) that the planner
prefers indexes, no hot path reads a big table whole, and each gallery filter, the credit
paths and the queue walks use their own index. Fails when a query change or a lost index turns
one into a scan. On both databases: a balance with nothing to grant takes no lock, a reserve
reads its buckets once, the queue's walks use the queue's partial index."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from bench.store import NOW, TIERS, generate, hot_paths, seed_postgresql
from core.jobs import DeliveryTarget
from core.request import GenerationRequest
from storage import accounts, gallery, jobs, ledger, retention
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.explain import capture, full_scans, plan, summary

Tx = Callable[[], AbstractContextManager[Session]]

BIG = frozenset({"images", "image_styles", "jobs", "credit_ledger", "reservations"})
# The index (or one of the indexes) each hot path must walk.
INDEXES: dict[str, str | tuple[str, ...]] = {
    "gallery first page": "ix_images_gallery",
    "gallery style": "ix_image_styles_gallery",
    "gallery style deep": "ix_image_styles_gallery",
    "gallery model": "ix_images_model",
    "gallery platform": "ix_images_platform",
    "gallery search": "ix_images_words",
    # An account's live buckets (two or three), not every daily bucket it ever had.
    "balance": "ix_credit_buckets_live",
    "admit + reserve": "ix_credit_buckets_live",
    "daily grant": "ix_credit_buckets_live",
    # The queue's own index, walked oldest first up to the limit (with a limit above the
    # queue's length, a bitmap of the queue's entries and a sort is as good).
    "reconcile in flight": ("ix_jobs_in_flight", "ix_jobs_status_created"),
    # (A count of the queue may read either index on (status, ...) alone: both hold it apart.)
    "reconcile pass": ("ix_jobs_in_flight", "ix_jobs_status_created"),
    "unfinished jobs (start)": "ix_jobs_in_flight",
}
# Retention steps whose finding query must use an index at this size too.
RETENTION_INDEXES = {
    "retention buckets": "ix_reservations_status_updated",
    "retention reservations": "ix_reservations_status_updated",
    "retention ledger": "ix_credit_ledger_created",
}


@pytest.fixture(scope="module")
def seeded(pg_admin: str | None) -> Iterator[Engine]:
    """60,000 images over 300 accounts (20,000 of account 1's), a year of jobs and ledger."""
    import uuid

    import psycopg

    if pg_admin is None:
        pytest.skip("PostgreSQL is unreachable")
    name = f"atelier_plans_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        seed_postgresql(url, generate(60_000, 300, 20_000, 365))
        engine = make_engine(url)
        yield engine
        engine.dispose()
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _paths(engine: Engine) -> dict[str, object]:
    sessions = session_factory(engine)
    with transaction(sessions) as s:
        deep = gallery.list_images(session=s, account_id=1, limit=100).items[-1]
    cursor = gallery.encode_cursor(deep.created_at, deep.id)
    paths = hot_paths(sessions, 20_000, 300, cursor)
    # (Retention deletes by IN-lists of hundreds of ids: at this size a scan is cheaper.)
    return {k: v for k, v in paths.items() if not k.startswith("retention")}


def test_hot_paths_read_no_big_table_whole(seeded: Engine) -> None:
    sessions = session_factory(seeded)
    problems: list[str] = []
    for name, fn in _paths(seeded).items():
        with capture(seeded) as seen, transaction(sessions) as s:
            fn(s, 1)  # type: ignore[operator]
        assert seen.statements, name
        used: list[str] = []
        with seeded.connect() as conn:
            for statement, params in seen.statements:
                tree = plan(conn, statement, params)
                used.append(summary(conn, tree))
                scans = full_scans(conn, tree, BIG)
                if scans:
                    problems.append(f"{name}: Seq Scan of {scans} in {statement[:200]}")
            conn.rollback()
        wanted = INDEXES.get(name, ())
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        if wanted and not any(index in u for index in wanted for u in used):
            problems.append(f"{name}: does not use {' or '.join(wanted)}: {used}")
    assert problems == [], "\n".join(problems)


def _plans(engine: Engine, fn: Callable[[Session], object]) -> tuple[list[str], list[str]]:
    """(one-line plans, statements) of what ``fn`` runs, rolled back."""
    sessions = session_factory(engine)
    with capture(engine) as seen, sessions() as s:
        try:
            fn(s)
        finally:
            s.rollback()
    used: list[str] = []
    with engine.connect() as conn:
        for statement, params in seen.statements:
            used.append(summary(conn, plan(conn, statement, params)))
        conn.rollback()
    return used, [st for st, _ in seen.statements]


def test_retention_finds_its_rows_through_indexes(seeded: Engine) -> None:
    paths = hot_paths(session_factory(seeded), 20_000, 300, "")
    for name, index in RETENTION_INDEXES.items():
        used, _ = _plans(seeded, lambda s, name=name: paths[name](s, 1))  # type: ignore[operator]
        assert any(index in u for u in used), (name, used)


def test_the_held_check_of_bucket_pruning_reads_only_old_holds(seeded: Engine) -> None:
    """The queue's 2,000 fresh holds cannot have taken from a bucket expired 90 days ago:
    the step no longer looks up their ledger rows."""
    used, statements = _plans(seeded, lambda s: retention.prune(
        session=s, now=NOW, keep=timedelta(days=90), keep_deleted=timedelta(days=30),
        batch=100, kinds=("buckets",)))
    assert not [st for st in statements if "FROM credit_ledger" in st], statements


# Both databases --------------------------------------------------------------------------------


def test_balance_with_nothing_to_grant_takes_no_lock(engine: Engine, tx: Tx) -> None:
    with tx() as s:
        acct = accounts.resolve_account(session=s, platform="discord", platform_user_id="p",
                                        default_tier="free", now=NOW)
        ledger.grant(session=s, account_id=acct.id, amount=5, key="k", now=NOW)
    with tx() as s:  # the first of the day grants today's allowance: locks and writes
        first = ledger.balance(session=s, account_id=acct.id, now=NOW, tiers=TIERS)
    with capture(engine) as seen, tx() as s:
        again = ledger.balance(session=s, account_id=acct.id, now=NOW + timedelta(hours=1),
                               tiers=TIERS)
    assert again.total == first.total == 15
    writes = [st for st, _ in seen.statements
              if "FOR UPDATE" in st or st.lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert writes == []
    # The next day it does grant again, and expires yesterday's: the locked path.
    with capture(engine) as seen, tx() as s:
        tomorrow = ledger.balance(session=s, account_id=acct.id, now=NOW + timedelta(days=1),
                                  tiers=TIERS)
    assert tomorrow.daily_left == 10 and tomorrow.total == 15
    assert any(st.lstrip().upper().startswith("INSERT") for st, _ in seen.statements)
    if engine.dialect.name == "postgresql":
        assert any("FOR UPDATE" in st for st, _ in seen.statements)


def test_reserve_reads_the_buckets_once(engine: Engine, tx: Tx) -> None:
    with tx() as s:
        acct = accounts.resolve_account(session=s, platform="discord", platform_user_id="r",
                                        default_tier="free", now=NOW)
        ledger.grant(session=s, account_id=acct.id, amount=5, key="r", now=NOW)
        job, _ = jobs.create_job(session=s, idempotency_key="r1", account_id=acct.id,
                                 identity_id=None, request=GenerationRequest(prompt="a fox"),
                                 delivery=DeliveryTarget(frontend="discord"), cost=12, now=NOW)
    with capture(engine) as seen, tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id=job.id, amount=12, now=NOW,
                       tiers=TIERS)  # the day's 10 (granted on the way), then 2 of the pack
    reads = [st for st, _ in seen.statements
             if st.lstrip().upper().startswith("SELECT") and "FROM credit_buckets" in st
             and "credit_buckets.key =" not in st.replace('"', "")]  # (the day's, once a day)
    assert len(reads) == 1, reads
    with tx() as s:
        assert ledger.balance(session=s, account_id=acct.id, now=NOW, tiers=TIERS).total == 3
        assert ledger.audit(session=s, account_id=acct.id).balanced


def test_queue_walks_use_the_queue_index(engine: Engine, tx: Tx) -> None:
    with tx() as s:
        acct = accounts.resolve_account(session=s, platform="discord", platform_user_id="q",
                                        default_tier="free", now=NOW)
        for n in range(3):
            jobs.create_job(session=s, idempotency_key=f"q{n}", account_id=acct.id,
                            identity_id=None, request=GenerationRequest(prompt="a fox"),
                            delivery=DeliveryTarget(frontend="discord"), cost=1,
                            job_id=f"q{n}", now=NOW + timedelta(seconds=n))
        jobs.set_status(session=s, job_id="q1", status=jobs.JobStatus.running)
        jobs.set_status(session=s, job_id="q2", status=jobs.JobStatus.cancelled)
    with tx() as s:
        assert jobs.in_flight_count(session=s) == 2
        assert [r[0] for r in jobs.in_flight_jobs(session=s, limit=10)] == ["q0", "q1"]
        assert [j.id for j in jobs.unfinished_jobs(session=s, limit=1)] == ["q0"]
    for fn in (lambda s: jobs.in_flight_jobs(session=s, limit=10),
               lambda s: jobs.unfinished_jobs(session=s)):
        used, _ = _plans(engine, fn)
        # SQLite without statistics (the app runs no ANALYZE) may take ix_jobs_status_created
        # and sort the queue: the queue either way, never the jobs table. (PostgreSQL: the
        # seeded test above.)
        assert any("ix_jobs_in_flight" in u or "ix_jobs_status_created" in u for u in used), used
