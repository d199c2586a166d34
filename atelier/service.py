"""Process wiring: the single-box stack (store, broker, local Ray workers, dispatcher, client)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine as DbEngine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.broker import Broker
from cluster.client import Client
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher
from core.settings import Mode, Settings

log = logging.getLogger(__name__)


@dataclass
class Stack:
    """What ``local_stack`` started; everything a front end or the CLI needs."""

    settings: Settings
    db: DbEngine
    sessions: sessionmaker[Session]
    broker: Broker
    client: Client
    dispatcher: Dispatcher | None
    workers: list[Any] = field(default_factory=list)
    device_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def local_profiles() -> list[Any]:
    """One DeviceProfile per local device: each GPU, or the CPU when there is none."""
    from cluster.devices import choose_profile, detect_devices

    infos = detect_devices()
    accelerators = [i for i in infos if i.kind != "cpu"]
    return [choose_profile(i) for i in (accelerators or infos[-1:])]


@contextlib.asynccontextmanager
async def local_stack(
    settings: Settings, *, dispatcher: bool = True, workers: bool = True,
    dispatcher_name: str | None = None,
) -> AsyncIterator[Stack]:
    """Start the single-box stack: the migrated store, Redis when it answers (else the
    in-process broker), Ray on 127.0.0.1 with one worker actor per local device, a dispatcher
    and the client. Everything stops when the block ends.

    ``dispatcher_name``: its consumer name, unique among the dispatchers sharing the broker.
    A stable one (`atelier up`) lets a restarted service take back its jobs in flight at once;
    the default (host and pid) suits a one-off run."""
    import ray

    from cluster.broker import connect_broker
    from cluster.placement import WorkerPool
    from cluster.worker import device_resource, init_local_ray, spawn_worker
    from storage.blobs import BlobStore
    from storage.db import check_migrated, make_engine, session_factory

    # 1. Store: refuse an un-migrated database (the message says to run `atelier db upgrade`).
    db = make_engine(settings.db_url)
    check_migrated(db)
    sessions = session_factory(db)
    # 2. Broker: a shared Redis when configured; production never falls back silently.
    broker = await connect_broker(
        settings.redis_url, claim_idle_ms=settings.dispatch.claim_timeout_ms,
        fallback=settings.mode is not Mode.production,
    )
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    handles: list[Any] = []
    started_ray = False
    try:
        client = Client(
            settings=settings,
            session_factory=sessions,
            broker=broker,
            blobs=BlobStore.from_settings(settings),
        )
        stack = Stack(
            settings=settings,
            db=db,
            sessions=sessions,
            broker=broker,
            client=client,
            dispatcher=None,
        )
        stack.notes.append(f"broker: {broker.kind}")
        if workers:
            # 3. Ray pinned to loopback; each local device offered as a `device:<class>` resource.
            profiles = local_profiles()
            resources: dict[str, float] = {}
            for p in profiles:
                key = device_resource(p.device_class)
                resources[key] = resources.get(key, 0) + 1
            if not ray.is_initialized():
                await asyncio.to_thread(
                    init_local_ray,
                    resources=resources,
                    namespace=RAY_NAMESPACE,
                    log_to_driver=False,
                )
                started_ray = True
            for n, profile in enumerate(profiles):
                handle = await asyncio.to_thread(
                    spawn_worker,
                    settings=settings,
                    profile=profile,
                    name=f"{WORKER_NAME_PREFIX}-{socket.gethostname()}-{os.getpid()}-{n}",
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
            stack.dispatcher = Dispatcher(
                settings=settings,
                session_factory=sessions,
                broker=broker,
                blobs=BlobStore.from_settings(settings),
                workers=pool,
                name=dispatcher_name or f"{socket.gethostname()}-{os.getpid()}",
            )
            task = asyncio.create_task(stack.dispatcher.run(stop))
            stack.notes.append(f"dispatcher: {stack.dispatcher.name}")
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
        db.dispose()
