"""Bot fixtures: the real PTB Application against the fake Bot API, over real Redis, the real
store (SQLite, migrated), a local Ray worker with a tiny pipeline and a Dispatcher in the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, select

from bots.common.state import RedisState
from bots.telegram.ratelimit import FloodLimiter
from bots.telegram.run import RunningBot, start_bot
from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.dispatcher import Dispatcher, Pacing
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.prompts import default_blocklist
from core.request import GenerationRequest
from core.settings import Settings, load_settings
from core.styles import default_registry
from engine.tiny import make_tiny_controlnet, make_tiny_models
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, upgrade
from storage.models import Image, Job
from testing.telegram import FakeTelegram

TOKEN = "123456789:AAF-test-token-for-the-fake-server"
WATCHED_LOGGERS = ("telegram", "discord", "bots")
# Flags that keep every job tiny: the tiny model at 64x64 with 2 steps.
TINY = "--w 64 --h 64 --steps 2"


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in WATCHED_LOGGERS:
            self.records.append(record)


@pytest.fixture(autouse=True)
def error_logs() -> Iterator[_Errors]:
    """PTB logs handler exceptions instead of raising them: any ERROR record from the bot's
    loggers fails the test (a test that expects one inspects and clears ``records``)."""
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    if handler.records:
        lines = [f"{r.name}: {r.getMessage()}" for r in handler.records]
        pytest.fail("ERROR logged during the test:\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("bots-tiny")
    make_tiny_models(data_dir / "models", seed=0)
    # A tiny random ControlNet in the operator's models file (``--control``), for the worker
    # and the bots' registry alike.
    make_tiny_controlnet(data_dir / "models" / "tiny-sd15", data_dir / "edges", seed=2)
    (data_dir / "models.toml").write_text(
        '[controlnets.edges]\nfile = "edges"\nfamily = "sd15"\npreprocessor = "canny"\n', "utf-8"
    )
    return data_dir


@pytest.fixture(scope="session")
def ray_worker(tiny_dir: Path) -> Iterator[Any]:
    """One CPU worker actor for the whole session on a loopback Ray.

    It takes no CPU or device-class resource, so tests/cluster can still place its own
    workers on the same Ray (started with the same resources) later in a full run.
    """
    import ray

    from cluster.contract import init_local_ray
    from engine.actor import spawn_worker

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    init_local_ray(
        # A new local instance even when another Ray runs on this machine (ray.init would
        # otherwise join the one named in /tmp/ray/ray_current_cluster).
        address="local",
        num_cpus=2,
        resources={"device:cpu": 1, "device:fake-gpu": 1},
        object_store_memory=200 * 1024 * 1024,
    )
    settings = load_settings(data_dir=tiny_dir, _env_file=None)
    handle = spawn_worker(
        settings=settings, device_class="cpu", name="bots-test-worker", num_cpus=0, resources={}
    )
    yield handle
    # Later tests (tests/cluster's multi-node faults) may have shut this Ray down and started
    # their own: then the handle is gone with it, and ray.kill would start yet another Ray.
    if ray.is_initialized():
        with contextlib.suppress(ray.exceptions.RayError):
            ray.kill(handle)
        if started:
            ray.shutdown()


class Stack:
    """Everything behind the bot, plus the bot itself (``start_bot`` / ``stop_bot``)."""

    def __init__(self, settings: Settings, fake: FakeTelegram, worker: Any, tiny_dir: Path):
        self.settings = settings
        self.fake = fake
        self.worker = worker
        self.registry = ModelRegistry.load(
            load_settings(data_dir=tiny_dir, _env_file=None)
        ).with_models(default="tiny")
        upgrade(settings.db_url)
        self.engine = make_engine(settings.db_url)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)
        self.broker = RedisBroker(str(settings.redis_url), claim_idle_ms=10_000)
        self.state = RedisState(str(settings.redis_url))
        self.blobs = BlobStore.from_settings(settings)
        self.client = Client(
            settings=settings,
            session_factory=self.sessions,
            broker=self.broker,
            blobs=self.blobs,
            models=self.registry,
            poll_interval_s=0.2,
            styles=default_registry(),
            blocklist=default_blocklist(),
        )
        self.bot: RunningBot | None = None
        self.app: Any = None
        self._stop = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None

    async def start(self, *, bot: bool = True) -> None:
        await self.fake.start()
        await self.start_dispatcher()
        if bot:
            await self.start_bot()

    async def start_dispatcher(self) -> None:
        pool = await WorkerPool.from_handles([self.worker])
        dispatcher = Dispatcher(
            dispatch=self.settings.dispatch.model_copy(update={"gather_window_ms": 20}),
            sessions=self.sessions,
            broker=self.broker,
            blobs=self.blobs,
            workers=pool,
            name="bots-test-dispatcher",
            models=self.registry,
            pacing=Pacing(read_block_ms=200, progress_interval_s=0.2),
        )
        self._stop = asyncio.Event()
        self._dispatcher = asyncio.create_task(dispatcher.run(self._stop))
        # Submit accepts a model once a worker has said it can load it (before any has, only
        # when this box has its files, which the bot's data dir here has not): wait for that.
        async with asyncio.timeout(30):
            while not await self.broker.registry.worker_models():
                await asyncio.sleep(0.05)

    async def stop_dispatcher(self) -> None:
        """Stop taking jobs (queued ones stay queued until ``start_dispatcher``)."""
        self._stop.set()
        if self._dispatcher is not None:
            await asyncio.wait_for(self._dispatcher, 60)
            self._dispatcher = None

    async def start_bot(self, **options: Any) -> None:
        options.setdefault("progress_interval_s", 0.3)
        # Burstier than Telegram so tests do not wait on the per-chat pacing.
        options.setdefault(
            "rate_limiter",
            FloodLimiter(private_per_s=20, private_burst=20, group_per_min=600, group_burst=20),
        )
        self.bot = await start_bot(
            self.settings, self.client, self.broker, state=self.state, poll_timeout=1, **options
        )
        self.app = self.bot.app

    async def stop_bot(self) -> None:
        if self.bot is None:
            return
        await self.bot.stop()
        self.bot = self.app = None

    async def close(self) -> None:
        await self.stop_bot()
        await self.stop_dispatcher()
        await self.fake.stop()
        await self.state.close()
        await self.broker.close()
        self.engine.dispose()

    # Looking at the store -------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        with self.sessions() as s:
            return list(s.exec(select(Job).order_by(Job.created_at)).all())

    def images(self, job_id: str | None = None) -> list[Image]:
        with self.sessions() as s:
            stmt = select(Image) if job_id is None else select(Image).where(Image.job_id == job_id)
            return list(s.exec(stmt).all())

    def request_of(self, job: Job) -> GenerationRequest:
        return GenerationRequest.model_validate_json(job.request_json)

    async def balance(self, user: int) -> int:
        from core.jobs import Requester

        return (
            await self.client.balance(Requester(platform="telegram", platform_user_id=str(user)))
        ).total

    async def finished(self, n: int = 1, timeout: float = 90) -> list[Job]:
        """Wait until ``n`` jobs exist and all are finished."""

        def done() -> list[Job] | None:
            jobs = self.jobs()
            return jobs if len(jobs) >= n and all(j.status.finished for j in jobs) else None

        return await self.fake.wait_for(done, timeout, f"{n} finished jobs")


@pytest.fixture
def fake() -> FakeTelegram:
    return FakeTelegram(TOKEN)


def settings_for(
    tmp_path: Path, redis_url: str | None, fake: FakeTelegram, **extra: Any
) -> Settings:
    """Settings of a bot on the fake: a client built from them defaults to the tiny model (the
    worker runs it from its own data dir)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models.toml").write_text('default = "tiny"\n')
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite:///{tmp_path / 'atelier.db'}",
        "redis_url": redis_url,
        "telegram_token": TOKEN,
        "telegram_api_base_url": fake.base_url,
        "telegram_file_base_url": fake.base_file_url,
        "public_base_url": "https://atelier.example",
        "signing_key": "k" * 40,
        **extra,
    }
    return load_settings(**options, _env_file=None)


@pytest.fixture
def bot_settings(tmp_path: Path, redis_url: str, fake: FakeTelegram) -> Settings:
    return settings_for(tmp_path, redis_url, fake)


@pytest.fixture
async def stack(
    bot_settings: Settings, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[Stack]:
    s = Stack(bot_settings, fake, ray_worker, tiny_dir)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def backend(
    bot_settings: Settings, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[Stack]:
    """The stack without the bot: for tests that start it their own way."""
    s = Stack(bot_settings, fake, ray_worker, tiny_dir)
    await s.start(bot=False)
    try:
        yield s
    finally:
        await s.close()


# The Discord suite's fixtures (they build on the Stack above).
from tests.bots.discord_conftest import (  # noqa: E402
    discord_backend,
    discord_fake,
    discord_settings,
    discord_stack,
)

__all__ = ["discord_backend", "discord_fake", "discord_settings", "discord_stack"]
