"""API fixtures: the real web app served by uvicorn on 127.0.0.1 in the test's loop, over the
real store (SQLite, migrated), real Redis, a local Ray worker with the tiny pipeline and a
Dispatcher; plus API keys made through ``storage.apikeys``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, select

from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.dispatcher import Dispatcher, Pacing
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.jobs import Requester
from core.prompts import default_blocklist
from core.settings import Settings, load_settings
from core.styles import default_registry
from engine.tiny import (
    make_tiny_controlnet,
    make_tiny_embedding,
    make_tiny_lora,
    make_tiny_models,
)
from storage import accounts, apikeys
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.models import Job
from web.app import create_app
from web.context import WebContext
from web.gallery.deliveries import settle_deliveries


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("web-tiny")
    make_tiny_models(data_dir / "models", seed=0)
    # A tiny random LoRA in the operator's models file, seen by the worker and the web app.
    make_tiny_lora(data_dir / "models" / "tiny-sd15", data_dir / "loras", seed=1)
    make_tiny_embedding(data_dir / "models" / "tiny-sd15", data_dir / "easyneg.safetensors")
    make_tiny_controlnet(data_dir / "models" / "tiny-sd15", data_dir / "edges", seed=2)
    (data_dir / "models.toml").write_text(
        '[loras.ink]\nfile = "loras/tiny-lora.safetensors"\nfamily = "sd15"\n'
        '[embeddings.easyneg]\nfile = "easyneg.safetensors"\nfamily = "sd15"\n'
        '[controlnets.edges]\nfile = "edges"\nfamily = "sd15"\npreprocessor = "canny"\n',
        "utf-8",
    )
    return data_dir


@pytest.fixture(scope="session")
def ray_worker(tiny_dir: Path) -> Iterator[Any]:
    """One CPU worker actor on a loopback Ray (shared with other packages' tests in one run:
    it asks for no CPU or device resource of its own)."""
    import ray

    from cluster.contract import init_local_ray
    from engine.actor import spawn_worker

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    init_local_ray(
        address="local", num_cpus=2, resources={"device:cpu": 1, "device:fake-gpu": 1},
        object_store_memory=200 * 1024 * 1024,
    )
    settings = load_settings(data_dir=tiny_dir, _env_file=None)
    handle = spawn_worker(
        settings=settings, device_class="cpu", name="web-api-test-worker", num_cpus=0,
        resources={},
    )
    yield handle
    if ray.is_initialized():
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(handle)
        if started:
            ray.shutdown()


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebStack:
    """The web app on a real socket, with everything behind it."""

    def __init__(self, settings: Settings, worker: Any, tiny_dir: Path) -> None:
        self.settings = settings
        self.worker = worker
        self.registry = ModelRegistry.load(
            load_settings(data_dir=tiny_dir, _env_file=None)
        ).with_models(default="tiny")
        upgrade(settings.db_url)
        self.engine = make_engine(settings.db_url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.broker = RedisBroker(str(settings.redis_url), claim_idle_ms=10_000)
        self.blobs = BlobStore.from_settings(settings)
        self.client = Client(
            settings=settings, session_factory=self.sessions, broker=self.broker,
            blobs=self.blobs, models=self.registry, poll_interval_s=0.2,
            styles=default_registry(),
            blocklist=default_blocklist(),
        )
        self.ctx = WebContext(
            settings=settings, sessions=self.sessions, blobs=self.blobs, client=self.client
        )
        self.app = create_app(self.ctx)
        self.url = ""
        self._server: _InLoopServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.start_dispatcher()
        self._drain_stop = asyncio.Event()
        # The web delivery stream's settling loop, as `atelier web` runs it beside the server.
        self._drain = asyncio.create_task(settle_deliveries(self.client, self._drain_stop))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _InLoopServer(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._serving.done():
                await self._serving
            await asyncio.sleep(0.01)

    async def start_dispatcher(self) -> None:
        pool = await WorkerPool.from_handles([self.worker])
        dispatcher = Dispatcher(
            dispatch=self.settings.dispatch.model_copy(update={"gather_window_ms": 20}),
            sessions=self.sessions, broker=self.broker, blobs=self.blobs, workers=pool,
            name="web-api-test-dispatcher", models=self.registry,
            pacing=Pacing(read_block_ms=200, progress_interval_s=0.1),
        )
        self._stop = asyncio.Event()
        self._dispatcher = asyncio.create_task(dispatcher.run(self._stop))

    async def stop_dispatcher(self) -> None:
        self._stop.set()
        if self._dispatcher is not None:
            await asyncio.wait_for(self._dispatcher, 60)
            self._dispatcher = None

    async def close(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, 10)
        self._drain_stop.set()
        await asyncio.wait_for(self._drain, 10)
        await self.stop_dispatcher()
        await self.broker.close()
        self.engine.dispose()

    # Keys, credits and rows ----------------------------------------------------------------

    def new_key(self, user: str, platform: str = "telegram") -> str:
        with transaction(self.sessions) as s:
            acc = accounts.resolve_account(
                session=s, platform=platform, platform_user_id=user,
                default_tier=self.settings.default_tier,
            )
            assert acc.identity is not None
            return apikeys.create_api_key(session=s, identity_id=acc.identity.id).key

    def revoke(self, key: str) -> None:
        with transaction(self.sessions) as s:
            apikeys.revoke_api_key(session=s, prefix=key)

    async def balance(self, user: str, platform: str = "telegram") -> int:
        requester = Requester(platform=platform, platform_user_id=user)
        return (await self.client.balance(requester)).total

    def jobs(self) -> list[Job]:
        with self.sessions() as s:
            return list(s.exec(select(Job).order_by(Job.created_at)).all())


def web_settings(tmp_path: Path, redis_url: str | None) -> Settings:
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models.toml").write_text('default = "tiny"\n')
    return load_settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{tmp_path / 'atelier.db'}",
        redis_url=redis_url,
        public_base_url="https://atelier.example",
        signing_key="k" * 40,
        _env_file=None,
    )


@pytest.fixture
async def web(
    tmp_path: Path, redis_url: str, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[WebStack]:
    stack = WebStack(web_settings(tmp_path, redis_url), ray_worker, tiny_dir)
    await stack.start()
    try:
        yield stack
    finally:
        await stack.close()
