"""The composition root: every Atelier process is built here from ``Settings`` (the single box
``atelier up``, ``atelier dispatcher``, ``atelier worker``, ``atelier web``, each bot's own
process, and the benches). The only place that constructs the store, the broker, the client,
the dispatcher, the bots' state, the web app's context and the worker processes; it owns
signal handling and supervision (every long-running task runs under ``cluster.supervise``:
an unexpected end is logged and restarted). The CLI modules only parse and call in here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import uvicorn
from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_MAX_DELIVERIES,
    Broker,
    BrokerUnavailable,
)
from cluster.client import Client
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher, Pacing
from cluster.health import (
    MetricsServer,
    Probe,
    broker_check,
    ray_check,
    store_check,
    with_probe,
)
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from cluster.supervise import supervise
from core.errors import ConfigError
from core.heap import startup_heap_frozen
from core.settings import Mode, Settings, parse_listen

if TYPE_CHECKING:
    from bots.common.state import BotState
    from web.context import WebContext

Stopper = Callable[[], Awaitable[None]]

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


@contextlib.contextmanager
def open_store(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database; DatabaseNotMigrated otherwise."""
    with open_db(settings) as (_, sessions):
        yield sessions


@contextlib.contextmanager
def open_engine(settings: Settings) -> Iterator[DbEngine]:
    """The database engine, migrated or not (`atelier db check` asks which)."""
    from storage.db import make_engine

    engine = make_engine(settings.db_url)
    try:
        yield engine
    finally:
        engine.dispose()


async def open_broker(
    settings: Settings, *, shared: bool, claim_idle_ms: int | None = None
) -> Broker:
    """The broker. ``shared``: this process meets others through it, so ATELIER_REDIS_URL is
    required and there is no in-process fallback (a private queue would never see them).
    Otherwise Redis when it answers, else the in-process broker (never in production)."""
    if shared and settings.redis_url is None:
        raise ConfigError("this process needs ATELIER_REDIS_URL, the Redis the others share")
    return await connect_broker(
        settings.redis_url,
        claim_idle_ms=claim_idle_ms or settings.dispatch.claim_timeout_ms,
        fallback=not shared and settings.mode is not Mode.production,
    )


async def connect_broker(
    redis_url: str | None,
    *,
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ping_timeout_s: float = 1.0,
    fallback: bool = True,
) -> Broker:
    """A RedisBroker if ``redis_url`` answers a PING in time, else a MemoryBroker.

    ``fallback=False`` raises BrokerUnavailable instead of falling back: use it wherever several
    processes must share the queue, since each would otherwise get its own private one.
    """
    from cluster.broker_memory import MemoryBroker
    from cluster.broker_redis import RedisBroker

    if redis_url:
        redis_broker = RedisBroker(
            redis_url, claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries
        )
        if await redis_broker.ping(timeout_s=ping_timeout_s):
            log.info("broker: Redis at %s", redis_broker.safe_url)
            return redis_broker
        await redis_broker.close()
        if not fallback:
            raise BrokerUnavailable(
                f"Redis at {redis_broker.safe_url} did not answer a PING within {ping_timeout_s} s"
            )
        log.warning(
            "broker: Redis at %s did not answer a PING within %s s; using the in-process broker, "
            "which only works when everything runs in this one process",
            redis_broker.safe_url,
            ping_timeout_s,
        )
    else:
        log.info("broker: no Redis URL configured; using the in-process broker")
    return MemoryBroker(claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)


def make_client(
    settings: Settings, sessions: sessionmaker[Session], broker: Broker,
    *, models: ModelRegistry | None = None, **options: Any,
) -> Client:
    """The client front ends use (``options``: Client's own, e.g. ``poll_interval_s``), with
    the registries it checks requests against: the models (``models``, else loaded from the
    settings), the curated styles and the prompt blocklist."""
    from core.prompts import Blocklist, default_blocklist
    from core.styles import default_registry
    from storage.blobs import BlobStore

    options.setdefault("styles", default_registry())
    if "blocklist" not in options:
        # The list the workers are configured with: admission's check is the one that counts
        # (the worker uses the prompts admission prepared).
        path = settings.blocklist_file
        options["blocklist"] = Blocklist.load(path) if path is not None else default_blocklist()
    return Client(
        settings=settings, session_factory=sessions, broker=broker,
        blobs=BlobStore.from_settings(settings),
        models=models if models is not None else ModelRegistry.load(settings), **options,
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


def stop_on_signals_blocking() -> threading.Event:
    """A threading event set by SIGTERM or SIGINT, for a command that waits without a loop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
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
            with startup_heap_frozen():
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
    async with shared_stack(settings) as stack, open_bot_state(settings, stack.broker) as state:
        stop = stop or stop_on_signals()
        bot = await start_bot(
            settings, stack.client, stack.broker, state=state,
            poll_timeout=DEFAULT_POLL_TIMEOUT_S if poll_timeout is None else poll_timeout,
        )
        try:
            async with serve_metrics(settings, stack, with_ray=False):
                with startup_heap_frozen():
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
    async with shared_stack(settings) as stack, open_bot_state(settings, stack.broker) as state:
        stop = stop or stop_on_signals()
        bot = await start_bot(
            settings, stack.client, stack.broker, state=state, sync=sync, guild_id=guild_id
        )
        try:
            async with serve_metrics(settings, stack, with_ray=False):
                with startup_heap_frozen():
                    await stop.wait()
        finally:
            await bot.stop()


@contextlib.asynccontextmanager
async def open_bot_state(settings: Settings, broker: Broker) -> AsyncIterator[BotState]:
    """The bots' own small state: on the Redis the broker uses, in-process where the broker
    fell back to one (closed when the block ends)."""
    from bots.common.state import make_state

    state = make_state(settings.redis_url if broker.kind == "redis" else None)
    try:
        yield state
    finally:
        await state.close()


async def start_bots(settings: Settings, stack: Stack) -> list[tuple[str, Stopper]]:
    """Start each configured bot over the in-process stack; return (name, async stop) pairs.
    A bot that cannot start (a refused token, say) stops `atelier up` with its one-line error."""
    started: list[tuple[str, Stopper]] = []

    async def start(name: str, starter: Callable[[BotState], Awaitable[Any]]) -> None:
        # The bot's state lives as long as the bot: its stop closes both.
        own = contextlib.AsyncExitStack()
        async with own:
            state = await own.enter_async_context(open_bot_state(settings, stack.broker))
            bot = await starter(state)
            own.push_async_callback(bot.stop)
            started.append((name.format(username=bot.username), own.pop_all().aclose))

    try:
        if settings.telegram_token is not None:
            from bots.telegram.run import start_bot

            await start("telegram (@{username})", lambda state: start_bot(
                settings, stack.client, stack.broker, state=state))
        if settings.discord_token is not None:
            from bots.discord.run import start_bot as start_discord

            await start("discord ({username})", lambda state: start_discord(
                settings, stack.client, stack.broker, state=state))
    except BaseException:
        for _, stopper in started:
            await stopper()
        raise
    return started


# The web app ------------------------------------------------------------------------------------


class _InLoopServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process that embeds it owns Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def web_context(stack: Stack) -> WebContext:
    """The web app's dependencies over a started stack."""
    from storage.blobs import BlobStore
    from web.context import WebContext
    from web.ratelimit import rate_counter_for

    return WebContext(
        settings=stack.settings,
        sessions=stack.sessions,
        blobs=BlobStore.from_settings(stack.settings),
        client=stack.client,
        rates=rate_counter_for(stack.broker),
    )


def _bind(settings: Settings, port: int | None = None) -> socket.socket:
    """A listening socket on ATELIER_WEB_LISTEN (``port``: this one instead of its port)."""
    host, listen_port = parse_listen(settings.web_listen)
    port = listen_port if port is None else port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on ATELIER_WEB_LISTEN={settings.web_listen!r}: {exc.strerror}"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def listen_url(settings: Settings, sock: socket.socket) -> str:
    """The address the app answers on (the bound port, which matters when 0 was asked)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@contextlib.asynccontextmanager
async def serve_web(stack: Stack) -> AsyncIterator[str]:
    """Serve the web app in this event loop while the block runs; yields the listen URL."""
    from web.app import create_app
    from web.gallery.deliveries import settle_deliveries

    app = create_app(web_context(stack))
    # /metrics and /readyz (store and broker reachable) on the web app's own port unless the
    # metrics port serves them (ATELIER_METRICS__ON_WEB_PORT); /healthz is the app's own.
    checks = {"store": store_check(stack.sessions), "broker": broker_check(stack.broker)}
    probe = Probe(checks, timeout_s=stack.settings.metrics.check_timeout_s)
    sock = _bind(stack.settings)
    paths = frozenset({"/metrics", "/readyz"})
    if not stack.settings.metrics.probes_on_web_port:
        paths = frozenset()
    config = uvicorn.Config(
        with_probe(app, probe, paths), log_level="warning",
        lifespan="off", proxy_headers=True, access_log=False,
    )
    url = listen_url(stack.settings, sock)
    bound_port = sock.getsockname()[1]
    servers: list[_InLoopServer] = []

    def serve() -> Awaitable[None]:
        # uvicorn closes its sockets when it ends: a restart listens again on the same port.
        listening = sock if not servers else _bind(stack.settings, bound_port)
        servers.append(_InLoopServer(config))
        return servers[-1].serve(sockets=[listening])

    # Both supervised: an unexpected end is logged and they start again.
    stop = asyncio.Event()
    task = asyncio.create_task(supervise("web server", serve, stop))
    settling = asyncio.create_task(
        supervise("web deliveries", lambda: settle_deliveries(stack.client, stop), stop)
    )
    try:
        while not (servers and servers[-1].started):
            if task.done() or len(servers) > 1:  # it ended before it started (logged)
                raise ConfigError(f"the web app did not start on {stack.settings.web_listen}")
            await asyncio.sleep(0.02)
        yield url
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(settling, timeout=5)
        if servers:
            servers[-1].should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=10)
        sock.close()


async def run_web(
    settings: Settings, *, ready: Callable[[str], None], stop: asyncio.Event | None = None
) -> None:
    """The web app as a process of its own over the shared Redis and database (jobs made from
    the gallery go to the dispatchers running elsewhere), until SIGINT/SIGTERM (or ``stop``);
    ``ready(url)`` once it listens."""
    stop = stop or stop_on_signals()
    async with (
        shared_stack(settings) as stack, serve_web(stack) as url,
        serve_metrics(settings, stack, with_ray=False),  # ATELIER_METRICS__PORT, if set
    ):
        ready(url)
        with startup_heap_frozen():
            await stop.wait()


# The single box -------------------------------------------------------------------------------


async def run_up(
    settings: Settings,
    *,
    ready: Callable[[Stack, str], Awaitable[None]],
    bots_ready: Callable[[list[str]], None],
    stop: asyncio.Event | None = None,
) -> None:
    """The single box until SIGINT/SIGTERM (or ``stop``): the local stack (Ray, a worker per
    device, the dispatcher), the web app, then every bot with a token. ``ready(stack, url)``
    once the web app listens, ``bots_ready(names)`` once the bots run."""
    stop = stop or stop_on_signals()
    # A stable dispatcher name: restarted after a crash, it takes back its jobs in flight at once.
    name = f"{socket.gethostname()}-up"
    async with local_stack(settings, dispatcher_name=name) as stack, serve_web(stack) as web_url:
        await ready(stack, web_url)
        bots = await start_bots(settings, stack)
        bots_ready([bot_name for bot_name, _ in bots])
        try:
            with startup_heap_frozen():
                await stop.wait()
        finally:
            for _, stopper in bots:
                await stopper()


# A worker box ---------------------------------------------------------------------------------


def join_worker(
    settings: Settings, address: str, node_ip: str | None, *, say: Callable[[str], None]
) -> None:
    """Join this box to the Ray cluster at ``address`` (``ray start``) and start a detached
    worker actor per local device on it; ``say`` reports each step."""
    import subprocess

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine.actor import spawn_worker

    profiles = local_profiles()
    resources = device_resources(profiles)
    cmd = ["ray", "start", f"--address={address}", f"--resources={json.dumps(resources)}"]
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    say("joining the Ray cluster: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    ray.init(address="auto", namespace=RAY_NAMESPACE, log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    for n, profile in enumerate(profiles):
        worker_name = f"{WORKER_NAME_PREFIX}-{node_id[:8]}-{n}"
        spawn_worker(
            settings=settings.worker_config(),
            profile=profile,
            name=worker_name,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        )
        say(f"worker {worker_name}: {profile.device_class}")


# The queue, for `atelier jobs` ------------------------------------------------------------------


async def queue_stats(settings: Settings) -> dict[str, Any] | None:
    """Queue depth, jobs read but unfinished and the newest 10 dead letters on the shared Redis;
    None without ATELIER_REDIS_URL (the single-box queue lives inside `atelier up`)."""
    if settings.redis_url is None:
        return None
    broker = await open_broker(settings, shared=True)
    try:
        return {
            "queued": await broker.jobs.queue_depth(),
            "pending": await broker.jobs.pending_count(),
            "dead": await broker.jobs.dead_letters(10),
        }
    finally:
        await broker.close()
