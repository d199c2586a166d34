"""Hot-path plans on PostgreSQL: with a store big enough (and ANALYZEd) that the planner
prefers indexes, no hot path reads a big table whole, and each gallery filter walks its own
keyset index. Fails when a query change or a lost index turns one into a scan."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from bench.store import generate, hot_paths, seed_postgresql
from storage import gallery
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.explain import capture, full_scans, plan, summary

BIG = frozenset({"images", "image_styles", "jobs", "credit_ledger", "reservations"})
# The index each gallery filter must walk.
INDEXES = {
    "gallery first page": "ix_images_gallery",
    "gallery style": "ix_image_styles_gallery",
    "gallery style deep": "ix_image_styles_gallery",
    "gallery model": "ix_images_model",
    "gallery platform": "ix_images_platform",
    "gallery search": "ix_images_search",
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
        if name in INDEXES and not any(INDEXES[name] in u for u in used):
            problems.append(f"{name}: does not use {INDEXES[name]}: {used}")
    assert problems == []
