"""Web fixtures: the app over a real store (SQLite and PostgreSQL, migrated), a real blob
store and a Client on the in-process broker, driven through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from core.settings import Settings, load_settings
from storage.blobs import BlobStore
from tests.storage.conftest import db_url, engine, factory, pg_admin  # noqa: F401 - fixtures
from web.app import create_app
from web.context import WebContext

BASE = "http://127.0.0.1:8000"


@dataclass
class Clock:
    at: datetime

    def __call__(self) -> datetime:
        return self.at


@dataclass
class Web:
    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    client: Client
    ctx: WebContext
    clock: Clock
    http: httpx.AsyncClient

    @property
    def key(self) -> bytes:
        return self.settings.resolved_signing_key


@pytest.fixture
def web_settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", _env_file=None, public_base_url=BASE)


@pytest.fixture
async def web(
    web_settings: Settings, factory: sessionmaker[Session]  # noqa: F811
) -> AsyncIterator[Web]:
    blobs = BlobStore.from_settings(web_settings)
    broker = MemoryBroker()
    client = Client(settings=web_settings, session_factory=factory, broker=broker, blobs=blobs,
                    poll_interval_s=0.1)
    clock = Clock(datetime.now(UTC))
    ctx = WebContext(settings=web_settings, sessions=factory, blobs=blobs, client=client,
                     now=clock)
    app = create_app(ctx)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        yield Web(web_settings, factory, blobs, client, ctx, clock, http)
    await broker.close()


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where browser screenshots go (kept with pytest's temp dirs)."""
    yield tmp_path_factory.mktemp("web-artifacts")
