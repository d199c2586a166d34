"""The store at a community's size (a script, not a test): seeds images over accounts (one
person with ``--big`` of them), a year of jobs, ledger rows, reservations and daily buckets,
a long queue and undelivered jobs, in bulk (PostgreSQL COPY with the secondary indexes built
after; SQLite executemany), then times every hot path through the repository functions (p50/p99,
each call its own transaction, as the app runs them, in a process whose start-up heap is frozen
as the services' are) beside its EXPLAINed plan, flagging any full scan of a big table.

``.venv/bin/python -m bench.store --db postgresql --images 10000000 --accounts 100000``
(PostgreSQL: a fresh database ``atelier_store_bench`` at ATELIER_TEST_PG_URL's server, dropped
after unless --keep) or ``--db sqlite --images 1000000`` (a file in a temp dir). Goal: every
hot path p99 <= 50 ms, no full scan."""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from sqlalchemy import Engine, text
from sqlmodel import Session

from core.heap import freeze_startup_heap
from core.jobs import DeliveryTarget
from core.request import GenerationRequest
from core.settings import Tier
from storage import accounts, gallery, jobs, ledger, retention, words
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.explain import capture, full_scans, plan, summary

PG_ADMIN = os.environ.get("ATELIER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)
WORDS = (  # noqa: SIM905 - a paragraph of words reads better than a list of strings
    "red blue green golden silver misty quiet stormy ancient neon tiny giant fox owl whale "
    "castle harbour forest desert city garden lighthouse mountain river bridge tower robot "
    "dragon cat dog horse ship train portrait landscape sunset sunrise night winter summer "
    "autumn spring rain snow fog watercolor oil sketch anime photo cinematic glowing dark"
).split()
STYLES = ["anime", "watercolor", "photo", "oil", "sketch", "pixel", "", ""]
MODELS = ["sd15", "sd15", "sdxl", "demo"]
PLATFORMS = ["telegram", "discord"]
TIERS = {"free": Tier(daily_allowance=10, concurrency=4, max_side=1024)}
REQUEST = GenerationRequest(prompt="a fox", width=512, height=512).model_dump_json()
BIG_TABLES = ("images", "image_styles", "jobs", "credit_ledger", "reservations",
              "credit_buckets", "identities", "accounts")
COLUMNS = {
    "accounts": ["id", "tier", "created_at"],
    "identities": ["id", "platform", "platform_user_id", "account_id", "created_at"],
    "jobs": ["id", "idempotency_key", "account_id", "identity_id", "request_json", "status",
             "attempts", "delivery_json", "cost", "created_at", "started_at", "finished_at",
             "updated_at", "delivered_at"],
    "images": ["id", "job_id", "account_id", "index", "seed", "width", "height", "blob_key",
               "sha256", "prompt", "negative", "styles", "model", "platform", "infotext",
               "created_at"],
    "image_styles": ["image_id", "style", "account_id", "created_at"],
    "credit_buckets": ["id", "account_id", "kind", "key", "granted", "remaining", "expires_at",
                       "expired_at", "created_at"],
    "credit_ledger": ["id", "account_id", "kind", "bucket", "amount", "job_id",
                      "idempotency_key", "expires_at", "created_at", "note"],
    "reservations": ["job_id", "account_id", "amount", "status", "created_at", "updated_at"],
}


def generate(n_images: int, n_accounts: int, big: int, days: int) -> Iterator[tuple[str, list]]:
    """Rows in chunks, table by table order-safe for foreign keys: accounts and identities
    first, then per chunk of jobs their images, styles, ledger rows, reservations."""
    rng = random.Random(7)
    yield "accounts", [(a, "free", NOW - timedelta(days=days + 1)) for a in
                       range(1, n_accounts + 1)]
    yield "identities", [(a, PLATFORMS[a % 2], f"u{a}", a, NOW - timedelta(days=days + 1))
                         for a in range(1, n_accounts + 1)]
    deliveries = {p: DeliveryTarget(frontend=p).model_dump_json() for p in PLATFORMS}
    image_id, ledger_id, bucket_id = 0, 0, 0
    span = days * 86400
    # Daily buckets: one per account for each of the last `days` days it was active (here:
    # every tenth day), spent and expired, plus today's live one.
    buckets: list[tuple] = []
    for a in range(1, n_accounts + 1):
        for d in list(range(days, 0, -10)) + [0]:
            bucket_id += 1
            day = (NOW - timedelta(days=d)).replace(hour=0, minute=0, second=0)
            expired = None if d == 0 else day + timedelta(days=1)
            buckets.append((bucket_id, a, "daily", f"daily:{a}:{day.date().isoformat()}", 10,
                            0 if d else 10, day + timedelta(days=1), expired, day))
        if len(buckets) >= 50_000:
            yield "credit_buckets", buckets
            buckets = []
    yield "credit_buckets", buckets
    chunk: dict[str, list] = {t: [] for t in ("jobs", "images", "image_styles",
                                              "credit_ledger", "reservations")}
    done = 0
    others = 1
    job_no = 0
    share = big / n_images  # account 1's share of the jobs, spread over the whole year
    while done < n_images:
        if n_accounts == 1 or rng.random() < share:
            account = 1
        else:
            others = others % (n_accounts - 1) + 1
            account = others + 1
        count = min(4, n_images - done)
        job_no += 1
        job_id = uuid.UUID(int=rng.getrandbits(128)).hex
        when = NOW - timedelta(seconds=span * (n_images - done) / n_images)
        platform = PLATFORMS[account % 2]
        status = "succeeded" if job_no % 20 else "failed"
        delivered = None if job_no % 5000 == 0 else when
        chunk["jobs"].append((job_id, job_id, account, account, REQUEST, status, 1,
                              deliveries[platform], count, when, when, when, when, delivered))
        ledger_id += 1
        chunk["credit_ledger"].append((ledger_id, account, "reserve", "daily", -count, job_id,
                                       f"reserve:{job_id}", None, when, ""))
        ledger_id += 1
        settle = "capture" if status == "succeeded" else "release"
        chunk["credit_ledger"].append((ledger_id, account, settle, "daily",
                                       0 if settle == "capture" else count, job_id,
                                       f"{settle}:{job_id}", None, when, ""))
        chunk["reservations"].append((job_id, account, count,
                                      "captured" if settle == "capture" else "released",
                                      when, when))
        if status == "succeeded":
            prompt = " ".join(rng.choice(WORDS) for _ in range(8))
            style = rng.choice(STYLES)
            model = rng.choice(MODELS)
            for i in range(count):
                image_id += 1
                chunk["images"].append((image_id, job_id, account, i, rng.getrandbits(31),
                                        512, 512, f"ab/cd/{image_id}.png", "0" * 64, prompt,
                                        "", style, model, platform, "", when))
                if style:
                    chunk["image_styles"].append((image_id, style, account, when))
        done += count
        if len(chunk["jobs"]) >= 20_000:
            yield from _flush(chunk)
    yield from _flush(chunk)
    # A long queue: queued and running jobs of the last minutes, each with a held reservation.
    for n in range(2000):
        job_id = f"queued-{n}"
        account = rng.randrange(1, n_accounts + 1)
        when = NOW - timedelta(seconds=2000 - n)
        status = "running" if n < 200 else "queued"
        chunk["jobs"].append((job_id, job_id, account, account, REQUEST, status, 0,
                              deliveries[PLATFORMS[account % 2]], 1, when, None, None, when,
                              None))
        ledger_id += 1
        chunk["credit_ledger"].append((ledger_id, account, "reserve", "daily", -1, job_id,
                                       f"reserve:{job_id}", None, when, ""))
        chunk["reservations"].append((job_id, account, 1, "held", when, when))
    yield from _flush(chunk)


def _flush(chunk: dict[str, list]) -> Iterator[tuple[str, list]]:
    for table in ("jobs", "images", "image_styles", "credit_ledger", "reservations"):
        if chunk[table]:
            yield table, chunk[table]
            chunk[table] = []


def _pg_value(v: Any) -> str:
    if v is None:
        return "\\N"
    if isinstance(v, datetime):
        return v.isoformat()
    return str(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def seed_postgresql(url: str, rows: Iterator[tuple[str, list]]) -> None:
    """COPY every chunk, with the big tables' secondary indexes dropped and built after."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s) AND indexname "
            "NOT IN (SELECT conname FROM pg_constraint)", (list(BIG_TABLES),)
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for table, chunk in rows:
            cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
            with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                buf = io.StringIO()
                for row in chunk:
                    buf.write("\t".join(_pg_value(v) for v in row))
                    buf.write("\n")
                copy.write(buf.getvalue())
        conn.execute("SET maintenance_work_mem = '512MB'")
        for _, definition in indexes:
            conn.execute(definition)
        for table in ("accounts", "identities", "images", "credit_buckets", "credit_ledger"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                         f"(SELECT max(id) FROM {table}))")
        conn.execute("VACUUM ANALYZE")


def _sqlite_value(v: Any) -> Any:
    return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v


def seed_sqlite(path: str, rows: Iterator[tuple[str, list]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    words.register(conn)  # the search index's triggers call it
    conn.execute("PRAGMA synchronous = OFF")
    tables = ", ".join(f"'{t}'" for t in BIG_TABLES)
    indexes = conn.execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        f"AND tbl_name IN ({tables})").fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    conn.execute("BEGIN")
    for table, chunk in rows:
        cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
        marks = ", ".join("?" for _ in COLUMNS[table])
        conn.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})",
                         [tuple(_sqlite_value(v) for v in r) for r in chunk])
    conn.execute("COMMIT")
    for _, definition in indexes:
        conn.execute(definition)
    conn.execute("ANALYZE")
    conn.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def hot_paths(sessions: Any, big: int, n_accounts: int, deep: str) -> dict[str, Callable]:
    """name -> fn(session, round) calling the repository functions a hot path runs."""
    rng = random.Random(3)

    def admit(s: Session, r: int) -> None:
        acct = accounts.resolve_account(session=s, platform=PLATFORMS[1], platform_user_id="u1",
                                        default_tier="free", now=NOW)
        jobs.find_job(session=s, idempotency_key=f"bench-{r}-{uuid.uuid4().hex}")
        ledger.lock_accounts(s, [acct.id])
        jobs.running_jobs_count(session=s, account_id=acct.id)
        made, _ = jobs.create_job(session=s, idempotency_key=uuid.uuid4().hex,
                                  account_id=acct.id, identity_id=1,
                                  request=GenerationRequest(prompt="a fox"),
                                  delivery=DeliveryTarget(frontend="discord"), cost=1, now=NOW)
        ledger.reserve(session=s, account_id=acct.id, job_id=made.id, amount=1, now=NOW,
                       tiers=TIERS)

    def job_status(s: Session, r: int) -> None:
        job = jobs.get_job(session=s, job_id=f"queued-{rng.randrange(200, 2000)}")
        jobs.queue_position(session=s, job=job)

    def page(**kw: Any) -> Callable[[Session, int], None]:
        return lambda s, r: gallery.list_images(session=s, account_id=1, **kw) and None

    return {
        "gallery first page": page(),
        "gallery search": page(search="fox castle"),
        "gallery search 1 word": page(search="red"),  # in 16% of prompts
        "gallery style": page(style="watercolor"),
        "gallery model": page(model="sdxl"),
        "gallery platform": page(platform="discord"),
        "gallery since/until": page(since=NOW - timedelta(days=200),
                                    until=NOW - timedelta(days=100)),
        "gallery deep cursor": page(before=deep),
        "gallery style deep": page(style="anime", before=deep),
        "balance": lambda s, r: ledger.balance(session=s, account_id=1, now=NOW, tiers=TIERS),
        "admit + reserve": admit,
        "job status": job_status,
        "history": lambda s, r: jobs.list_jobs(session=s, account_id=1, limit=5),
        "daily grant": lambda s, r: ledger.balance(
            session=s, account_id=2 + r % (n_accounts - 2), now=NOW + timedelta(days=1),
            tiers=TIERS),
        # A reconciler pass with the broker in step counts the queue and stops; one that
        # finds the broker short reads the queue (up to its limit).
        "reconcile pass": lambda s, r: jobs.in_flight_count(session=s),
        "reconcile in flight": lambda s, r: jobs.in_flight_jobs(session=s, limit=10_000),
        "reconcile undelivered": lambda s, r: jobs.undelivered_jobs(
            session=s, finished_before=NOW - timedelta(minutes=1), window=timedelta(days=1)),
        "undelivered count": lambda s, r: jobs.undelivered_count(
            session=s, since=NOW - timedelta(days=1)),
        # Not a hot path: a front end's start (its jobs in flight followed again), in a task
        # of its own; timed and plan-checked, kept out of the goal.
        "unfinished jobs (start)": lambda s, r: jobs.unfinished_jobs(session=s),
        **{f"retention {kind}": prune_step(kind) for kind in retention.PruneReport.model_fields},
    }


def prune_step(kind: str) -> Callable[[Session, int], None]:
    """One batch of 100 rows of one kind of retention (measured, then rolled back)."""
    return lambda s, r: retention.prune(
        session=s, now=NOW, keep=timedelta(days=90), keep_deleted=timedelta(days=30),
        batch=100, kinds=(kind,)) and None


def measure(engine: Engine, name: str, fn: Callable, rounds: int, rollback: bool) -> tuple:
    sessions = session_factory(engine)
    explained: list[tuple[str, list[str]]] = []
    with capture(engine) as seen, transaction(sessions) as s:
        fn(s, -1)
    with engine.connect() as conn:
        for statement, params in seen.statements:
            tree = plan(conn, statement, params)
            explained.append((summary(conn, tree), full_scans(conn, tree)))
        conn.rollback()
    samples = []
    for r in range(rounds):
        start = time.perf_counter()
        if rollback:  # a prune batch: measured, then undone, so every round has work
            with sessions() as s:
                try:
                    fn(s, r)
                finally:
                    s.rollback()
        else:
            with transaction(sessions) as s:
                fn(s, r)
        samples.append((time.perf_counter() - start) * 1000)
    return (*percentiles(samples), explained)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--big", type=int, default=100_000, help="images of account 1")
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    ap.add_argument("--cache", action="store_true",
                    help="keep a seeded copy (PostgreSQL: a template database, SQLite: a file "
                         "in the temp dir) and start from it when one of this size exists, so "
                         "two versions of the code are measured on the same rows")
    args = ap.parse_args()
    big = min(args.big, args.images)
    tmp = tempfile.mkdtemp(prefix="atelier-store-")
    size = f"{args.images}_{args.accounts}_{big}_{args.days}"
    if args.db == "sqlite":
        url = f"sqlite:///{tmp}/store.db"
        cached = Path(tempfile.gettempdir()) / f"atelier-store-seed-{size}.db"
        reuse = args.cache and cached.exists()
    else:
        name = "atelier_store_bench"
        seed_name = f"atelier_store_seed_{size}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            reuse = args.cache and conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (seed_name,)).fetchone() is not None
            template = f' TEMPLATE "{seed_name}"' if reuse else ""
            conn.execute(f'CREATE DATABASE "{name}"{template}')
        url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    try:
        start = time.perf_counter()
        if reuse:
            if args.db == "sqlite":
                shutil.copyfile(cached, f"{tmp}/store.db")
            upgrade(url)  # a copy seeded by older code gets this code's migrations
            analyze = make_engine(url)
            with analyze.connect() as conn:
                conn.execute(text("ANALYZE"))
                conn.commit()
            analyze.dispose()
            print(f"{args.db}: started from the cached seed of {args.images:,} images over "
                  f"{args.accounts:,} accounts (account 1: {big:,}), {args.days} days, in "
                  f"{time.perf_counter() - start:.0f} s")
        else:
            upgrade(url)
            rows = generate(args.images, args.accounts, big, args.days)
            if args.db == "sqlite":
                seed_sqlite(f"{tmp}/store.db", rows)
            else:
                seed_postgresql(url, rows)
            took = time.perf_counter() - start
            print(f"{args.db}: seeded {args.images:,} images over {args.accounts:,} accounts "
                  f"(account 1: {big:,}), {args.days} days, in {took:.0f} s "
                  f"({args.images / took:,.0f} images/s with their jobs and ledger)")
            if args.cache and args.db == "sqlite":
                shutil.copyfile(f"{tmp}/store.db", cached)
            elif args.cache:
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{seed_name}"')
                    conn.execute(f'CREATE DATABASE "{seed_name}" TEMPLATE "{name}"')
        sys.stdout.flush()
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                for table in BIG_TABLES:
                    n = conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                    print(f"  {table}: {n:,} rows")
                conn.rollback()
            run(engine, args, big)
        finally:
            engine.dispose()
    finally:
        if args.db == "sqlite" and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.db == "postgresql" and not args.keep:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute('DROP DATABASE IF EXISTS "atelier_store_bench" WITH (FORCE)')


def run(engine: Engine, args: argparse.Namespace, big: int) -> None:
    sessions = session_factory(engine)
    with transaction(sessions) as s:  # credits for the admit rounds
        ledger.grant(session=s, account_id=1, amount=10**7, key="bench", now=NOW)
    with transaction(sessions) as s:  # a cursor 90% of the way down account 1's gallery
        first = gallery.list_images(session=s, account_id=1, limit=1).items[0]
        oldest = NOW - timedelta(days=args.days)
        deep_at = oldest + (first.created_at - oldest) * 0.1
        deep = gallery.encode_cursor(deep_at, 1 << 30)
    worst = 0.0
    scans = 0
    # As the services run (core.heap): what the process built to start is kept out of the
    # garbage collector's way, else a full collection (~40 ms here) lands in 1-2% of rounds.
    freeze_startup_heap()
    print(f"{'hot path':24} {'p50 ms':>8} {'p99 ms':>8}  plan")
    for name, fn in hot_paths(sessions, big, args.accounts, deep).items():
        p50, p99, explained = measure(engine, name, fn, args.rounds,
                                      rollback=name.startswith("retention"))
        if not name.endswith("(start)"):
            worst = max(worst, p99)
        bad = sorted({t for _, found in explained for t in found})
        scans += len(bad)
        flag = f"FULL SCAN of {', '.join(bad)}" if bad else "ok"
        print(f"{name:24} {p50:8.2f} {p99:8.2f}  {flag}")
        for line in dict.fromkeys(line for line, _ in explained):  # each plan once
            print(f"{'':44}{line[:150]}")
    print(f"worst p99 of the hot paths {worst:.1f} ms (goal <= 50), full scans of big tables: "
          f"{scans}")


if __name__ == "__main__":
    main()
