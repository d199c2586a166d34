"""The SQLite store's in-process writer lock keeps SQLite's semantics: writers wait their turn
and see each other's commits, readers never wait for it, a writer stuck for the whole busy
timeout gets SQLite's own error, and the lock is never left taken. (What it is for, fewer
busy-handler sleeps, is speed: bench/submits.py shows it.)"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

import storage.db as store_db
from storage.db import make_engine, session_factory, transaction, upgrade


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(url)
    return url


def test_writers_queue_and_readers_do_not(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    writers, readers = session_factory(engine), session_factory(engine, read_only=True)
    holding, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        with transaction(writers) as s:
            s.execute(text("CREATE TABLE t (n INTEGER)"))
            holding.set()
            release.wait(10)
            order.append("first commits")

    def second() -> None:
        with transaction(writers) as s:
            order.append("second writes")
            s.execute(text("INSERT INTO t VALUES (1)"))

    try:
        a = threading.Thread(target=first)
        a.start()
        assert holding.wait(10)
        b = threading.Thread(target=second)
        b.start()
        time.sleep(0.3)
        assert order == []  # the second writer waits for the first...
        with transaction(readers) as s:  # ...and a reader does not
            assert s.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        release.set()
        a.join(10)
        b.join(10)
        assert order == ["first commits", "second writes"]
        with transaction(readers) as s:
            assert s.execute(text("SELECT n FROM t")).scalars().all() == [1]
    finally:
        release.set()
        engine.dispose()


def test_a_writer_kept_waiting_past_the_busy_timeout_is_told(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_db, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    engine = make_engine(sqlite_url)
    writers = session_factory(engine)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction(writers):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        with (
            pytest.raises(sqlite3.OperationalError, match="database is locked"),
            transaction(writers),
        ):
            pass
    finally:
        release.set()
        holder.join(10)
        engine.dispose()
    with transaction(writers) as s:  # the lock was not left taken
        s.execute(text("SELECT 1"))
