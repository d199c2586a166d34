"""Storage fixtures: each test runs on SQLite (a temp file) and on PostgreSQL (a fresh database
made for the test and dropped after it), both migrated through ``storage.db.upgrade``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.settings import Tier
from storage import accounts
from storage.db import make_engine, session_factory, transaction, upgrade
from tests.conftest import forbid_in_fast_tier

PG_ADMIN_URL = os.environ.get("ATELIER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def _require_services() -> bool:
    return os.environ.get("ATELIER_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session")
def pg_admin() -> str | None:
    """The admin URL when PostgreSQL answers, else None (checked once per session)."""
    forbid_in_fast_tier("PostgreSQL")
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return PG_ADMIN_URL
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}".splitlines()[0]
        if _require_services():
            pytest.fail(reason + " (ATELIER_REQUIRE_SERVICES=1)")
        return None


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, un-migrated database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'atelier.db'}"
        return
    admin = request.getfixturevalue("pg_admin")
    if admin is None:
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable")
    name = f"atelier_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def backend(db_url: str) -> str:
    return "sqlite" if db_url.startswith("sqlite") else "postgresql"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    eng = make_engine(db_url, pool_size=5, max_overflow=15)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


@pytest.fixture
def tx(factory: sessionmaker[Session]) -> Callable[[], AbstractContextManager[Session]]:
    """``with tx() as s:`` runs one committed unit of work."""
    return lambda: transaction(factory)


@pytest.fixture
def tiers() -> dict[str, Tier]:
    return {
        "free": Tier(daily_allowance=3, concurrency=2, max_side=1024),
        "pro": Tier(daily_allowance=20, concurrency=4, max_side=2048),
        "packs-only": Tier(daily_allowance=0, concurrency=1, max_side=1024),
    }


@pytest.fixture
def new_account(
    tx: Callable[[], AbstractContextManager[Session]],
) -> Callable[..., accounts.AccountRead]:
    """Make an account reached through a fresh identity."""

    def make(tier: str = "free", platform: str = "telegram") -> accounts.AccountRead:
        with tx() as s:
            return accounts.resolve_account(
                session=s,
                platform=platform,
                platform_user_id=uuid.uuid4().hex,
                display_name="someone",
                default_tier=tier,
                now=NOW,
            )

    return make


@pytest.fixture
def now() -> datetime:
    """A fixed clock: noon UTC; tests move it explicitly."""
    return NOW
