"""``storage.db.Store``, the one way async code runs SQL (the cluster's services, every web
route through ``WebContext.store``): off the event loop, one transaction per call, and readers
that do not queue behind a writer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from storage.db import Store, make_engine, session_factory


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
    try:
        yield engine
    finally:
        engine.dispose()


def _bodies(session: Session) -> list[str]:
    return list(session.execute(text("SELECT body FROM notes ORDER BY id")).scalars())


async def _ticks_while(work: asyncio.Future[object] | asyncio.Task[object]) -> int:
    """How many 10 ms ticks the event loop ran while ``work`` was under way."""
    ticks = 0
    while not work.done():
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


async def test_a_call_runs_off_the_event_loop(sqlite: Engine) -> None:
    store = Store(session_factory(sqlite))
    loop_thread = threading.get_ident()

    def slow(session: Session) -> int:
        assert threading.get_ident() != loop_thread
        time.sleep(0.5)  # a slow query: it blocks its thread, never the loop
        return int(session.execute(text("SELECT 41 + 1")).scalar_one())

    work = asyncio.ensure_future(store(slow))
    ticks = await _ticks_while(work)
    assert await work == 42
    # 0.5 s is 50 ticks; on a busy machine far fewer run, but a blocked loop would run none.
    assert ticks >= 10, ticks


async def test_each_call_is_one_transaction(sqlite: Engine) -> None:
    store = Store(session_factory(sqlite))
    await store(lambda s: s.execute(text("INSERT INTO notes (body) VALUES ('kept')")))

    def half_done(session: Session) -> None:
        session.execute(text("INSERT INTO notes (body) VALUES ('lost')"))
        raise RuntimeError("the second half failed")

    with pytest.raises(RuntimeError, match="second half"):
        await store(half_done)
    assert await store(_bodies, read_only=True) == ["kept"]


async def test_a_reader_does_not_queue_behind_a_writer(sqlite: Engine) -> None:
    store = Store(session_factory(sqlite))
    await store(lambda s: s.execute(text("INSERT INTO notes (body) VALUES ('before')")))
    writing = threading.Event()

    def long_write(session: Session) -> None:
        session.execute(text("INSERT INTO notes (body) VALUES ('after')"))
        writing.set()
        time.sleep(1.0)  # holds SQLite's write lock (BEGIN IMMEDIATE) this long

    writer = asyncio.ensure_future(store(long_write))
    assert await asyncio.to_thread(writing.wait, 10)
    started = time.monotonic()
    seen = await store(_bodies, read_only=True)
    waited = time.monotonic() - started
    assert not writer.done() and seen == ["before"]  # read during the write, before its commit
    assert waited < 0.8, waited
    await writer
    assert await store(_bodies, read_only=True) == ["before", "after"]


def test_a_connection_that_failed_in_the_driver_is_not_reused(
    engine: Engine, backend: str
) -> None:
    """A transaction that fails in the driver hands no connection back to the pool as it was
    (an aborted savepoint or a half-read result there would poison the next transaction, which
    a payment retried after an outage must not meet); our own errors keep the connection, and
    SQLite (in process) keeps its connection either way."""
    from sqlalchemy.exc import DBAPIError

    from core.errors import NotFound
    from storage.db import transaction

    factory = session_factory(engine)
    who = "SELECT pg_backend_pid()" if backend == "postgresql" else "SELECT 1"

    def connection_id() -> object:
        """The server process on PostgreSQL; on SQLite the driver's connection object."""
        with transaction(factory) as s:
            pid = s.execute(text(who)).scalar()
            return pid if backend == "postgresql" else s.connection().connection.dbapi_connection

    first = connection_id()
    assert connection_id() == first  # the pool hands the same one back

    with pytest.raises(NotFound), transaction(factory) as s:  # our error: kept
        s.execute(text(who)).scalar()
        raise NotFound("nothing here")
    assert connection_id() == first

    with pytest.raises(DBAPIError), transaction(factory) as s:
        s.begin_nested()
        s.execute(text("SELECT no_such_column FROM no_such_table"))
    after = connection_id()
    assert (after != first) == (backend == "postgresql")
    with transaction(factory) as s:  # and the store goes on working
        assert s.execute(text("SELECT 1")).scalar() == 1
