"""Engines, sessions and migrations for SQLite (single box) or PostgreSQL (psycopg 3); Alembic
is configured in code, without an alembic.ini, so ``upgrade`` works from an installed package."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, ResourceClosedError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from core.errors import ConfigError, DatabaseNotMigrated
from storage import words
from storage.models import (
    FTS_TABLE,
    PG_PROMPT_INDEX,
    PG_SEARCH_INDEX,
    PG_WORDS_INDEX,
    SQLITE_WORDS_TABLE,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a SQLite writer waits for the write lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30.0
# Execution option that makes a SQLite transaction start with a plain (deferred) BEGIN.
READ_ONLY = "atelier_read_only"
# Writers to one SQLite file in this process queue on a lock of ours, in the order they come,
# rather than in SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms between its tries: of
# eight submits at once, the last returns 1.2-1.5x sooner (bench/submits.py). Writers in
# other processes still meet the busy handler.
_SQLITE_WRITERS: dict[str, threading.Lock] = {}
_SQLITE_WRITERS_GUARD = threading.Lock()
# What the store raises while it cannot be reached (a PostgreSQL restarting, a SQLite file
# locked too long) or a connection is out of step with its server (a result that should have
# rows has none): long-running loops wait these out and try again, as broker outages.
STORE_ERRORS: tuple[type[Exception], ...] = (
    DBAPIError, psycopg.Error, sqlite3.OperationalError, ResourceClosedError,
)


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; ``postgresql://`` and ``postgres://`` get the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"cannot parse the database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise ConfigError(
            f"unsupported database driver {parsed.drivername!r}; use sqlite:// or postgresql://"
        )
    return parsed


def make_engine(url: str | URL, *, echo: bool = False, **kwargs: Any) -> Engine:
    """An engine with Atelier's connection settings; ``kwargs`` go to ``create_engine``."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, echo=echo, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(parsed, echo=echo, **kwargs)


def _sqlite_engine(url: URL, *, echo: bool, **kwargs: Any) -> Engine:
    database = url.database or ""
    in_memory = database in ("", ":memory:")
    connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    if in_memory:
        # One shared connection, or every checkout would see a different empty database.
        kwargs.setdefault("poolclass", StaticPool)
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module; the "begin" hook below emits our own.
        dbapi_conn.isolation_level = None
        words.register(dbapi_conn)  # the search index's triggers call it
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            if not in_memory:
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")  # durable enough under WAL
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front, so a transaction that reads and then
        # writes can never be refused half-way (no lock upgrade, no SQLITE_BUSY deadlock).
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """A ``sessionmaker`` of SQLModel sessions. ``read_only`` sessions start with a deferred
    BEGIN on SQLite (they do not queue behind writers); use them only for reads."""
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind=bind, class_=Session, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error. Writers to a SQLite file
    take its in-process writer lock first (see _SQLITE_WRITERS)."""
    lock = _sqlite_writer_lock(factory)
    if lock is not None and not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_S):
        raise sqlite3.OperationalError(
            f"database is locked: another writer in this process held it for "
            f"{SQLITE_BUSY_TIMEOUT_S:g}s"
        )
    try:
        with factory() as session, session.begin():
            try:
                yield session
            except STORE_ERRORS:
                _discard_connection(session)
                raise
    finally:
        if lock is not None:
            lock.release()


def _discard_connection(session: Session) -> None:
    """A transaction that failed in the driver (not with one of our errors) never hands its
    connection back to the pool: whatever state it was left in (an aborted savepoint, a result
    half read), the next transaction gets a fresh connection. Costs one reconnect. (Not on
    SQLite: in process, nothing to fall out of step, and an in-memory database lives in its
    one connection.)"""
    with contextlib.suppress(Exception):
        if session.get_bind().dialect.name != "sqlite":
            session.connection().invalidate()


T = TypeVar("T")


def read_only_sessions(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """The read-only twin of a session factory (deferred BEGIN on SQLite), or the factory
    itself when it is not bound to an engine."""
    bind = factory.kw.get("bind")
    return session_factory(bind, read_only=True) if isinstance(bind, Engine) else factory


class Store:
    """The one way async code runs the synchronous repository functions: off the event loop,
    each call in one transaction of its own."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self._readers = read_only_sessions(sessions)

    async def __call__(self, fn: Callable[[Session], T], *, read_only: bool = False) -> T:
        """``fn(session)`` in one committed transaction on a worker thread. ``read_only``: a
        deferred BEGIN on SQLite, so polling readers never queue behind writers."""
        factory = self._readers if read_only else self.sessions

        def work() -> T:
            with transaction(factory) as session:
                return fn(session)

        return await asyncio.to_thread(work)


def _sqlite_writer_lock(factory: sessionmaker[Session]) -> threading.Lock | None:
    bind = factory.kw.get("bind")
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        return None
    if bind.get_execution_options().get(READ_ONLY, False):
        return None
    key = bind.url.render_as_string(hide_password=False)
    with _SQLITE_WRITERS_GUARD:
        return _SQLITE_WRITERS.setdefault(key, threading.Lock())


# Migrations ---------------------------------------------------------------------------------


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic Config pointing at the packaged migrations, built without an ini file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate filter: leave out the dialect-specific search objects the migration made."""
    if name is None:
        return True
    searches = (PG_PROMPT_INDEX, PG_SEARCH_INDEX, PG_WORDS_INDEX)
    return not (name.startswith((FTS_TABLE, SQLITE_WORDS_TABLE)) or name in searches)


def schema_diff(engine: Engine) -> list[Any]:
    """Differences between the models and the database (empty when migrations match them)."""
    from alembic.autogenerate import compare_metadata
    from sqlmodel import SQLModel

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": include_object}
        )
        diff = list(compare_metadata(ctx, SQLModel.metadata))
        conn.rollback()
    return diff


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise ConfigError(f"no migrations found in {MIGRATIONS_DIR}")
    return str(head)


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (what ``atelier db upgrade`` runs)."""
    _migrate(url, command.upgrade, revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Undo migrations down to ``revision``."""
    _migrate(url, command.downgrade, revision)


def _migrate(url: str | URL, step: Callable[[Config, str], None], revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            step(cfg, revision)
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        rev = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return rev


def check_migrated(engine: Engine) -> None:
    """Raise DatabaseNotMigrated unless the database is at the code's head revision."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseNotMigrated(
            f"the database at {where} is at revision {current}, which this code does not know "
            f"(it needs {head}); it was migrated by a newer Atelier"
        )
    raise DatabaseNotMigrated(
        f"the database at {where} is not migrated (at revision {current or 'none'}, code needs "
        f"{head}); run `atelier db upgrade`"
    )
