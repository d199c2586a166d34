"""PostgreSQL restarted under a running service (a private server, stopped with ``pg_ctl -m
immediate`` as in a crash, then started again): the dispatcher waits the outage out, says so in
its log and on /readyz, and jobs submitted before and after complete. Under `atelier up`'s
assembly (local_stack and the web app) and under a dispatcher process of its own
(run_dispatcher, what `atelier dispatcher` runs). A batch that ends while the store is down is
settled once it is back; the web app's deliveries loop goes on too."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import ray
from PIL import Image

from atelier.app import (
    device_resources,
    local_stack,
    make_client,
    open_broker,
    open_db,
    run_dispatcher,
    serve_web,
    shared_stack,
)
from bench.chaos_services import Postgres
from cluster.broker import JobEntry
from cluster.client import Client
from cluster.contract import ImageResult, init_local_ray
from cluster.dispatcher import RAY_NAMESPACE, Pacing
from cluster.events import terminal_event
from cluster.settling import Held, PatientStore, Settler
from core.jobs import DeliveryTarget, JobStatus, Requester
from core.request import GenerationRequest
from core.settings import load_settings
from engine.actor import spawn_worker
from engine.devices import DeviceProfile
from storage import gallery
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.db import Store, upgrade
from storage.models import utcnow
from tests.cluster.conftest import TinyModels
from tests.cluster.scrape import get
from tests.conftest import forbid_in_fast_tier, free_port, service_missing
from web.gallery.deliveries import FRONTEND, settle_deliveries

pytestmark = pytest.mark.services

# The idle dispatcher asks the store twice a second (its reconcile pass), so it meets the
# outage at once rather than up to 30 s later, as it would with the default pacing.
PACING = Pacing(reconcile_interval_s=0.5)


@pytest.fixture
def pg() -> Iterator[Postgres]:
    """A migrated database on a PostgreSQL server of this test's own."""
    forbid_in_fast_tier("PostgreSQL")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        service_missing("PostgreSQL server binaries (pg_ctl)")
    server = Postgres(Path("/tmp"))
    try:
        server.init()
        upgrade(server.url)
        yield server
    finally:
        server.remove()


async def _job(client: Client, seed: int) -> str:
    request = GenerationRequest(prompt="a fox", model="tiny", width=64, height=64, steps=2,
                                scheduler="Euler", seed=seed)
    job = await client.submit(
        request, Requester(platform="web", platform_user_id="outage"),
        DeliveryTarget(frontend="web"), uuid.uuid4().hex,
    )
    event = await asyncio.wait_for(client.wait(job.job_id), 45)
    assert event.kind == "done", event
    return job.job_id


async def _readyz(url: str, wanted: Callable[[int, str], bool], timeout: float = 20) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(OSError):
            status, body = await get(url)
            if wanted(status, body):
                return body
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{url} never answered as wanted; last: {status} {body!r}")
        await asyncio.sleep(0.2)


async def _restart(
    pg: Postgres, readyz: list[str], caplog: pytest.LogCaptureFixture,
    meanwhile: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Stop PostgreSQL; every /readyz says not ready, naming the store and the dispatcher
    waiting for it, and the dispatcher's log says so (then ``meanwhile``); then start it:
    ready again."""
    await asyncio.to_thread(pg.stop, "immediate")
    for url in readyz:
        body = await _readyz(
            url, lambda status, body: status == 503 and "dispatcher: store unavailable" in body
        )
        assert "store: OperationalError" in body, body
    said = [r.getMessage() for r in caplog.records
            if r.name == "cluster.dispatcher" and r.levelno >= logging.WARNING]
    assert any("store unavailable (OperationalError" in m for m in said), said
    if meanwhile is not None:
        await meanwhile()
    await asyncio.to_thread(pg.start)
    for url in readyz:
        body = await _readyz(url, lambda status, body: status == 200)
        assert "dispatcher: ok" in body, body


async def test_atelier_up_rides_out_a_postgresql_restart(
    pg: Postgres, tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        data_dir=tiny_models.data_dir, database_url=pg.url, web_listen="127.0.0.1:0",
        metrics={"port": 0, "check_timeout_s": 2.0, "on_web_port": True}, _env_file=None,
    )
    async with local_stack(settings, pacing=PACING) as stack, serve_web(stack) as web_url:
        assert stack.metrics is not None
        readyz = [f"http://127.0.0.1:{stack.metrics.port}/readyz", f"{web_url}/readyz"]
        first = await _job(stack.client, 1)
        # An entry arriving while the store is down (a duplicate of the first job, as a
        # reconcile pass makes) is decided once it is back: acked, not left pending.
        await _restart(pg, readyz, caplog, lambda: stack.broker.jobs.enqueue(first, {"dup": "1"}))
        await _job(stack.client, 2)
        deadline = asyncio.get_running_loop().time() + 20
        while await stack.broker.jobs.pending_count() or await stack.broker.jobs.queue_depth():
            assert asyncio.get_running_loop().time() < deadline, "an entry was left behind"
            await asyncio.sleep(0.2)


async def test_a_dispatcher_process_rides_out_a_postgresql_restart(
    pg: Postgres, tiny_models: TinyModels, cpu_profile: DeviceProfile, redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    settings = load_settings(
        data_dir=tiny_models.data_dir, database_url=pg.url, redis_url=redis_url,
        metrics={"port": port, "check_timeout_s": 2.0}, _env_file=None,
    )
    started_ray = not ray.is_initialized()
    if started_ray:
        init_local_ray(resources=device_resources([cpu_profile]), namespace=RAY_NAMESPACE,
                       log_to_driver=False)
    prefix = f"outage-{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(settings=settings.worker_config(), profile=cpu_profile,
                          name=f"{prefix}-0")
    stop = asyncio.Event()
    try:
        async with shared_stack(settings) as stack:
            dispatcher = asyncio.create_task(run_dispatcher(
                settings, name="outage", stop=stop, worker_prefix=prefix, pacing=PACING,
            ))
            await _job(stack.client, 1)
            await _restart(pg, [f"http://127.0.0.1:{port}/readyz"], caplog)
            await _job(stack.client, 2)
            assert not dispatcher.done()
            stop.set()
            await asyncio.wait_for(dispatcher, 40)
    finally:
        stop.set()
        ray.kill(worker)
        if started_ray:
            ray.shutdown()


async def test_a_batch_ending_while_postgresql_is_down_is_settled_once_it_is_back(
    pg: Postgres, tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=tiny_models.data_dir, database_url=pg.url, _env_file=None)
    with open_db(settings) as (_, sessions):
        broker = await open_broker(settings, shared=False)
        try:
            client = make_client(settings, sessions, broker, models=tiny_models.registry)
            request = GenerationRequest(prompt="a fox", model="tiny", width=64, height=64)
            submitted = await client.submit(
                request, Requester(platform="web", platform_user_id="outage"),
                DeliveryTarget(frontend="web"), uuid.uuid4().hex,
            )
            now = utcnow()
            started = await Store(sessions)(lambda s: job_repo.start_attempts(
                session=s, job_ids=[submitted.job_id], now=now, stale_before=now, owner="d1",
            ))
            job = started[submitted.job_id]
            png = io.BytesIO()
            Image.new("RGB", (64, 64), "red").save(png, format="PNG")
            result = ImageResult(job.id, 0, 7, None, png.getvalue(), 64, 64, "a fox", "", "",
                                 "tiny")
            settle = Settler(name="d1", broker=broker, db=PatientStore(sessions),
                             blobs=BlobStore.from_settings(settings), max_attempts=3)
            # The worker's images arrive just after PostgreSQL went down.
            await asyncio.to_thread(pg.stop, "immediate")
            storing = asyncio.create_task(
                settle.store_done(Held([JobEntry("1-0", job.id)], job), [result])
            )
            deadline = asyncio.get_running_loop().time() + 20
            while "store unavailable (OperationalError" not in caplog.text:
                assert not storing.done(), storing
                assert asyncio.get_running_loop().time() < deadline, caplog.text
                await asyncio.sleep(0.1)
            await asyncio.to_thread(pg.start)
            settled = await asyncio.wait_for(storing, 60)
            assert settled is not None and settled.status is JobStatus.succeeded
            images = await Store(sessions)(
                lambda s: gallery.list_job_images(session=s, job_id=job.id)
            )
            assert [i.seed for i in images] == [7]
        finally:
            await broker.close()


async def test_the_web_deliveries_loop_waits_out_a_postgresql_restart(
    pg: Postgres, tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=tiny_models.data_dir, database_url=pg.url, _env_file=None)
    with open_db(settings) as (_, sessions):
        broker = await open_broker(settings, shared=False, claim_idle_ms=1000)
        stop = asyncio.Event()
        try:
            client = make_client(settings, sessions, broker, models=tiny_models.registry)
            submitted = await client.submit(
                GenerationRequest(prompt="a fox", model="tiny"),
                Requester(platform="web", platform_user_id="outage"),
                DeliveryTarget(frontend=FRONTEND), uuid.uuid4().hex,
            )
            job = await Store(sessions)(lambda s: job_repo.finish_and_release(
                session=s, job_id=submitted.job_id, status=JobStatus.cancelled, error="test",
            ))
            # Its announcement is read while PostgreSQL is down: confirming it fails.
            await asyncio.to_thread(pg.stop, "immediate")
            await broker.deliveries.publish_delivery(FRONTEND, terminal_event(job, []).to_fields())
            loop = asyncio.create_task(settle_deliveries(client, stop))
            deadline = asyncio.get_running_loop().time() + 20
            while "web deliveries: store unavailable (OperationalError" not in caplog.text:
                assert not loop.done(), loop
                assert asyncio.get_running_loop().time() < deadline, caplog.text
                await asyncio.sleep(0.1)
            await asyncio.to_thread(pg.start)
            while (await Store(sessions)(
                lambda s: job_repo.get_job(session=s, job_id=job.id), read_only=True
            )).delivered_at is None:
                assert not loop.done(), loop
                assert asyncio.get_running_loop().time() < deadline + 20, caplog.text
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await broker.close()
        await asyncio.wait_for(loop, 10)
