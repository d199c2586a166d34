"""Web fixtures: the app over a real store (SQLite and PostgreSQL, migrated), a real blob
store and a Client on the in-process broker, driven through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.prompts import default_blocklist
from core.settings import Settings, load_settings
from core.styles import default_registry
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
    # A worker that can load the tiny models, as its dispatcher would publish it (these routes
    # submit jobs; no worker runs them here).
    await broker.registry.publish_worker_models("web-test", ["tiny", "tiny-xl"], ttl_s=3600)
    client = Client(settings=web_settings, session_factory=factory, broker=broker, blobs=blobs,
                    poll_interval_s=0.1,
                    models=ModelRegistry.load(web_settings),
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
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


@pytest.fixture(scope="session")
def web_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.tiny import make_tiny_models

    data_dir = tmp_path_factory.mktemp("web-tiny")
    make_tiny_models(data_dir / "models", seed=0)
    return data_dir


@pytest.fixture(scope="session")
def web_ray_worker(web_tiny_dir: Path) -> Iterator[Any]:
    """One CPU worker actor on a loopback Ray (the one already running in a full test run,
    else a new one), named for these tests so it never collides with the bots' worker."""
    import contextlib

    import ray

    from cluster.contract import init_local_ray
    from engine.actor import spawn_worker

    started = not ray.is_initialized()
    # The same resources as tests/bots asks for: whichever starts Ray first, both fit.
    init_local_ray(address="local", num_cpus=2, resources={"device:cpu": 1, "device:fake-gpu": 1},
                   object_store_memory=200 * 1024 * 1024)
    settings = load_settings(data_dir=web_tiny_dir, _env_file=None)
    handle = spawn_worker(settings=settings.worker_config(), device_class="cpu",
                          name="web-test-worker", num_cpus=0, resources={})
    yield handle
    if ray.is_initialized():
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(handle)
        if started:
            ray.shutdown()
