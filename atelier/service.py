"""Process assembly, in one place: the store, the broker, Ray and its workers, the client and the
dispatcher, put together for each kind of process (the single box, a dispatcher of its own, a
bot of its own) and for the benches. Nothing else builds these parts from settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker import Broker
from cluster.client import Client
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher, Pacing
from cluster.health import MetricsServer, Probe, broker_check, ray_check, store_check
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from cluster.supervise import supervise
from core.errors import ConfigError
from core.settings import Mode, Settings

log = logging.getLogger(__name__)


@dataclass
class Stack:
    """What an assembly started; everything a front end, the CLI or a bench needs."""

    settings: Settings
    db: DbEngine
    sessions: sessionmaker[Session]
    broker: Broker
    client: Client
    dispatcher: Dispatcher | None
    models: ModelRegistry | None = None
    workers: list[Any] = field(default_factory=list)
    device_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: MetricsServer | None = None  # /metrics /healthz /readyz, when a port is set


# The parts -------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_db(settings: Settings) -> Iterator[tuple[DbEngine, sessionmaker[Session]]]:
    """The migrated store (DatabaseNotMigrated, saying to run `atelier db upgrade`, otherwise)."""
    from storage.db import check_migrated, make_engine, session_factory

    db = make_engine(settings.db_url)
    try:
        check_migrated(db)
        yield db, session_factory(db)
    finally:
        db.dispose()


async def open_broker(
    settings: Settings, *, shared: bool, claim_idle_ms: int | None = None
) -> Broker:
    """The broker. ``shared``: this process meets others through it, so ATELIER_REDIS_URL is
    required and there is no in-process fallback (a private queue would never see them).
    Otherwise Redis when it answers, else the in-process broker (never in production)."""
    from cluster.broker import connect_broker

    if shared and settings.redis_url is None:
        raise ConfigError("this process needs ATELIER_REDIS_URL, the Redis the others share")
    return await connect_broker(
        settings.redis_url,
        claim_idle_ms=claim_idle_ms or settings.dispatch.claim_timeout_ms,
        fallback=not shared and settings.mode is not Mode.production,
    )


def make_client(
    settings: Settings, sessions: sessionmaker[Session], broker: Broker,
    *, models: ModelRegistry | None = None, **options: Any,
) -> Client:
    """The client front ends use (``options``: Client's own, e.g. ``poll_interval_s``)."""
    from storage.blobs import BlobStore

    return Client(
        settings=settings, session_factory=sessions, broker=broker,
        blobs=BlobStore.from_settings(settings), models=models, **options,
    )


def make_dispatcher(
    settings: Settings, sessions: sessionmaker[Session], broker: Broker, workers: WorkerPool,
    *, name: str | None = None, models: ModelRegistry | None = None,
    pacing: Pacing | None = None, profile_for: Any = None,
) -> Dispatcher:
    """A dispatcher over ``workers`` with the settings' batching and retries, and autoscaling
    when ``ATELIER_AUTOSCALE__ENABLED`` (``profile_for``: fake devices for its workers, tests)."""
    from cluster.autoscale import Autoscaler
    from engine.actor import spawn_worker
    from storage.blobs import BlobStore

    autoscaler = None
    if settings.autoscale.enabled:
        autoscaler = Autoscaler(
            settings.autoscale, worker_config=settings.worker_config(),
            prefix=WORKER_NAME_PREFIX, profile_for=profile_for, spawn=spawn_worker,
        )
    return Dispatcher(
        dispatch=settings.dispatch, sessions=sessions, broker=broker,
        blobs=BlobStore.from_settings(settings), workers=workers,
        models=models if models is not None else ModelRegistry.load(settings),
        name=name or default_name(), pacing=pacing, autoscaler=autoscaler,
    )


@contextlib.asynccontextmanager
async def serve_metrics(
    settings: Settings, stack: Stack, *, with_ray: bool
) -> AsyncIterator[MetricsServer | None]:
    """/metrics, /healthz and /readyz (store, broker and, ``with_ray``, Ray reachable) on
    ATELIER_METRICS__HOST:PORT while the block runs; nothing when no port is set."""
    if settings.metrics.port is None:
        yield None
        return
    checks = {"store": store_check(stack.sessions), "broker": broker_check(stack.broker)}
    if with_ray:
        checks["ray"] = ray_check()
    probe = Probe(checks, timeout_s=settings.metrics.check_timeout_s)
    server = await MetricsServer(probe, settings.metrics.host, settings.metrics.port).start()
    stack.metrics = server
    try:
        yield server
    finally:
        await server.stop()


def default_name() -> str:
    """A consumer name unique per process: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def local_profiles() -> list[Any]:
    """One DeviceProfile per local device: each GPU, or the CPU when there is none."""
    from engine.devices import choose_profile, detect_devices

    infos = detect_devices()
    accelerators = [i for i in infos if i.kind != "cpu"]
    return [choose_profile(i) for i in (accelerators or infos[-1:])]


def device_resources(profiles: list[Any]) -> dict[str, float]:
    """The ``device:<class>`` Ray resources a node offers for ``profiles``: one slot each."""
    from cluster.contract import device_resource

    resources: dict[str, float] = {}
    for p in profiles:
        key = device_resource(p.device_class)
        resources[key] = resources.get(key, 0) + 1
    return resources


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


# The processes ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_stack(
    settings: Settings, *, dispatcher: bool = True, workers: bool = True,
    dispatcher_name: str | None = None, pacing: Pacing | None = None,
) -> AsyncIterator[Stack]:
    """Start the single-box stack: the migrated store, Redis when it answers (else the
    in-process broker), Ray on 127.0.0.1 with one worker actor per local device, a dispatcher
    and the client. Everything stops when the block ends.

    ``dispatcher_name``: its consumer name, unique among the dispatchers sharing the broker.
    A stable one (`atelier up`) lets a restarted service take back its jobs in flight at once;
    the default (host and pid) suits a one-off run. ``pacing``: the dispatcher's (tests).
    The dispatcher is supervised: an unexpected end is logged and it starts again."""
    import ray

    from cluster.contract import init_local_ray
    from engine.actor import spawn_worker

    # 1. Store: refuse an un-migrated database (the message says to run `atelier db upgrade`).
    with open_db(settings) as (db, sessions):
        # 2. Broker: a shared Redis when configured; production never falls back silently.
        broker = await open_broker(settings, shared=False)
        stop = asyncio.Event()
        task: asyncio.Task[None] | None = None
        handles: list[Any] = []
        started_ray = False
        try:
            models = ModelRegistry.load(settings)
            stack = Stack(
                settings=settings, db=db, sessions=sessions, broker=broker,
                client=make_client(settings, sessions, broker, models=models),
                dispatcher=None, models=models,
            )
            stack.notes.append(f"broker: {broker.kind}")
            if workers:
                # 3. Ray pinned to loopback; each local device offered as a resource.
                profiles = local_profiles()
                if not ray.is_initialized():
                    await asyncio.to_thread(
                        init_local_ray, resources=device_resources(profiles),
                        namespace=RAY_NAMESPACE, log_to_driver=False,
                    )
                    started_ray = True
                for n, profile in enumerate(profiles):
                    handle = await asyncio.to_thread(
                        spawn_worker,
                        settings=settings.worker_config(),
                        profile=profile,
                        name=f"{WORKER_NAME_PREFIX}-{default_name()}-{n}",
                    )
                    handles.append(handle)
                    stack.device_classes.append(profile.device_class)
                stack.workers = handles
                stack.notes.append(
                    "ray: local on 127.0.0.1, workers: " + ", ".join(stack.device_classes)
                )
            if dispatcher and handles:
                # 4. The dispatcher, in this process, over the workers just started.
                pool = await WorkerPool.from_handles(handles)
                stack.dispatcher = d = make_dispatcher(
                    settings, sessions, broker, pool, models=models, name=dispatcher_name,
                    pacing=pacing,
                )
                task = asyncio.create_task(
                    supervise("dispatcher", lambda: d.run(stop), stop, trouble=lambda: d.trouble)
                )
                stack.notes.append(f"dispatcher: {stack.dispatcher.name}")
            async with serve_metrics(settings, stack, with_ray=workers) as server:
                if server is not None:
                    stack.notes.append(f"metrics: http://{server.host}:{server.port}/metrics")
                yield stack
        finally:
            stop.set()
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
            for handle in handles:
                with contextlib.suppress(Exception):
                    ray.kill(handle)
            if started_ray:
                await asyncio.to_thread(ray.shutdown)
            await broker.close()


@contextlib.asynccontextmanager
async def shared_stack(
    settings: Settings, *, claim_idle_ms: int | None = None
) -> AsyncIterator[Stack]:
    """A process that meets the others through the shared Redis and database: a bot or a
    dispatcher of its own (no Ray here; ``run_dispatcher`` joins it)."""
    with open_db(settings) as (db, sessions):
        broker = await open_broker(settings, shared=True, claim_idle_ms=claim_idle_ms)
        try:
            models = ModelRegistry.load(settings)
            yield Stack(
                settings=settings, db=db, sessions=sessions, broker=broker,
                client=make_client(settings, sessions, broker, models=models),
                dispatcher=None, models=models,
            )
        finally:
            await broker.close()


async def run_dispatcher(
    settings: Settings,
    *,
    name: str | None = None,
    stop: asyncio.Event | None = None,
    ray_address: str | None = "auto",
    namespace: str = RAY_NAMESPACE,
    worker_prefix: str = WORKER_NAME_PREFIX,
    claim_idle_ms: int | None = None,
    pacing: Pacing | None = None,
) -> None:
    """Run one dispatcher until ``stop`` is set (or SIGTERM/SIGINT): over the shared Redis,
    the migrated store and Ray (``ray_address``, e.g. "auto" or "ray://head:10001"), finding
    the workers `atelier worker` started by their name prefix."""
    import ray

    from cluster.placement import ray_discovery

    if settings.redis_url is None:
        raise ConfigError("a dispatcher process needs ATELIER_REDIS_URL (a shared broker)")
    async with shared_stack(settings, claim_idle_ms=claim_idle_ms) as stack:
        if not ray.is_initialized():
            await asyncio.to_thread(
                ray.init, address=ray_address, namespace=namespace, log_to_driver=False
            )
        stop = stop or stop_on_signals()
        pool = WorkerPool(discover=ray_discovery(worker_prefix))
        dispatcher = make_dispatcher(
            settings, stack.sessions, stack.broker, pool, name=name, models=stack.models,
            pacing=pacing,
        )
        async with serve_metrics(settings, stack, with_ray=True):
            await supervise(
                "dispatcher", lambda: dispatcher.run(stop), stop,
                trouble=lambda: dispatcher.trouble,
            )


async def run_telegram_bot(
    settings: Settings, *, stop: asyncio.Event | None = None, poll_timeout: int | None = None
) -> None:
    """The Telegram bot as a process of its own, until SIGINT/SIGTERM (or ``stop``). It
    reaches the dispatchers through Redis only, so ATELIER_REDIS_URL is required."""
    from bots.telegram.run import DEFAULT_POLL_TIMEOUT_S, start_bot

    if settings.telegram_token is None:
        raise ConfigError("ATELIER_TELEGRAM_TOKEN is required to run the Telegram bot")
    if settings.redis_url is None:
        raise ConfigError(
            "ATELIER_REDIS_URL is required to run the Telegram bot on its own: it reaches the "
            "dispatchers through Redis (`atelier up` runs the bot in-process without one)"
        )
    async with shared_stack(settings) as stack:
        stop = stop or stop_on_signals()
        bot = await start_bot(
            settings, stack.client, stack.broker,
            poll_timeout=DEFAULT_POLL_TIMEOUT_S if poll_timeout is None else poll_timeout,
        )
        try:
            async with serve_metrics(settings, stack, with_ray=False):
                await stop.wait()
        finally:
            await bot.stop()


async def run_discord_bot(
    settings: Settings,
    *,
    sync: bool = False,
    guild_id: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """The Discord bot as a process of its own, until SIGINT/SIGTERM (or ``stop``); ``sync``
    registers the slash commands first (in ``guild_id``, or globally). It reaches the
    dispatchers through Redis only, so ATELIER_REDIS_URL is required."""
    from bots.discord.run import start_bot

    if settings.discord_token is None:
        raise ConfigError("ATELIER_DISCORD_TOKEN is required to run the Discord bot")
    if settings.redis_url is None:
        raise ConfigError(
            "ATELIER_REDIS_URL is required to run the Discord bot on its own: it reaches the "
            "dispatchers through Redis (`atelier up` runs the bot in-process without one)"
        )
    async with shared_stack(settings) as stack:
        stop = stop or stop_on_signals()
        bot = await start_bot(settings, stack.client, stack.broker, sync=sync, guild_id=guild_id)
        try:
            async with serve_metrics(settings, stack, with_ray=False):
                await stop.wait()
        finally:
            await bot.stop()
