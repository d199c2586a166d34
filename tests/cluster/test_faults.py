"""Faults across nodes and processes, on real services: a three-node Ray cluster on loopback with a
tiny-Diffusers worker on each worker node, Redis, SQLite or PostgreSQL. A job fails on every
worker; Redis is killed and restarted under load, or frozen; a dispatcher process is SIGKILLed
mid-batch; a worker is SIGKILLed mid-job; a node is removed mid-run. What each checks is the
pipeline's promise: every accepted job ends once, run and captured or refunded, with one
delivery, and within a stated bound.

The tests share one Ray cluster; each starts by bringing back the nodes and workers an earlier
one took away, so the destructive ones come last to spare restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import ray
import ray.exceptions as rex
import redis.asyncio as aioredis
from ray._private import ray_constants
from ray.cluster_utils import Cluster as RayCluster
from sqlalchemy import Engine

from cluster import keys
from cluster.broker import Broker
from cluster.broker_redis import RedisBroker
from cluster.client import Client, SubmittedJob
from cluster.contract import device_resource
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher, Pacing
from cluster.events import EventKind, JobEvent
from cluster.placement import WorkerPool, ray_discovery
from cluster.registry import ModelRegistry
from core.jobs import JobStatus
from core.prompts import default_blocklist
from core.settings import Settings, Tier, WorkerConfig, load_settings
from core.styles import default_registry
from engine.actor import spawn_worker
from engine.devices import DeviceProfile
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.db import session_factory
from storage.gallery import list_job_images
from storage.jobs import JobRead
from storage.models import CreditKind, utcnow
from tests.cluster.helpers import Cluster, audit, kill_redis, ledger_rows, req, submit, who
from tests.conftest import RedisServer

if TYPE_CHECKING:
    from ray._private.node import Node

    from tests.cluster.conftest import TinyModels

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
WORKERS = 2  # worker nodes, one worker actor each; the head node runs none
# Ray declares a silent node dead after about period x threshold (default: 5 s x 5 = 25 s).
HEALTH_CHECK = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
CLAIM_IDLE_MS = 2000
MAX_ATTEMPTS = 3
# Bounds promised and asserted. Taking over (a lost worker's or node's jobs placed again, a dead
# dispatcher's claimed) depends on the fault detection alone: Ray's health check, the claim
# timeout. Finishing adds running the jobs again, on 2 cores other people use as well.
TAKEOVER_BOUND_S = 10.0
FINISH_BOUND_S = 60.0
# Jobs that run long enough on the tiny model to be caught mid-run by a kill (about 0.6 s an
# image on an idle core), and shorter ones that still span a few progress ticks.
LONG = {"width": 256, "height": 256, "steps": 20}
# The dispatcher process's worker lease, and how long after it lapses its orphaned batch must
# have stopped (the next step's end; steps of ORPHAN_JOB take ~0.1-0.5 s here).
ORPHAN_LEASE_S = 1.0
ORPHAN_STOP_BOUND_S = 5.0
ORPHAN_JOB = {"width": 256, "height": 256, "steps": 50}
MEDIUM = {"width": 128, "height": 128, "steps": 20}
DISPATCH_OPTIONS: dict[str, Any] = {
    "gather_window_ms": 50, "job_timeout_s": 60, "max_attempts": MAX_ATTEMPTS,
    "max_batch_items": 4,
    # No front end marks jobs delivered here: only a broker restart re-announces them (the
    # grace-period path is tested in test_redelivery.py), so the other tests count on one each.
    "redeliver_grace_s": 3600.0,
}
PACING = Pacing(
    progress_interval_s=0.05, cancel_poll_s=0.1, read_block_ms=100, refresh_interval_s=1.0,
    epoch_check_s=0.5, reconcile_interval_s=2.0, drain_timeout_s=20, reconcile_grace_s=0.0,
)


# The Ray cluster (module) ------------------------------------------------------------------------


@dataclass
class RayNodes:
    """A head node (the driver's) and WORKERS worker nodes, each offering one CPU worker slot
    and a ``fault-node-{i}`` resource that pins worker ``i`` to it."""

    cluster: RayCluster
    worker_settings: WorkerConfig
    profile: DeviceProfile
    nodes: dict[int, Node] = field(default_factory=dict)
    handles: dict[int, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @staticmethod
    def name(i: int) -> str:
        return f"{WORKER_NAME_PREFIX}-{i}"

    @staticmethod
    def index(worker_id: str) -> int:
        return int(worker_id.rsplit("-", 1)[1])

    @staticmethod
    def resources(i: int) -> dict[str, float]:
        return {device_resource("cpu"): 1, f"fault-node-{i}": 1}

    def add_node(self, i: int) -> None:
        self.nodes[i] = self.cluster.add_node(
            node_ip_address=LOOPBACK, num_cpus=1, resources=self.resources(i)
        )

    def remove_node(self, i: int) -> None:
        """Kill every process of node ``i`` at once (raylet, workers): the machine is gone."""
        self.handles.pop(i, None)
        self.cluster.remove_node(self.nodes.pop(i), allow_graceful=False)

    def handle(self, worker_id: str) -> Any:
        return self.handles[self.index(worker_id)]

    def ensure(self) -> None:
        """Every node up, every worker answering with the tiny model loaded."""
        for i in range(WORKERS):
            if i not in self.nodes:
                self.add_node(i)
        missing = [i for i in range(WORKERS) if not self._answers(i)]
        if not missing:
            return
        # A dead actor keeps its name while a handle to it lives: let go of ours (and of the
        # pools of earlier tests) before a new worker takes the name.
        for i in missing:
            self.handles.pop(i, None)
        gc.collect()
        with ThreadPoolExecutor(len(missing)) as pool:  # actor start-up dominates
            for i, handle in zip(missing, pool.map(self._spawn, missing), strict=True):
                self.handles[i] = handle

    def _answers(self, i: int) -> bool:
        handle = self.handles.get(i)
        if handle is None:
            return False
        try:
            ray.get(handle.health.remote(), timeout=10)
        except (rex.RayError, TimeoutError):
            return False
        return True

    def _spawn(self, i: int) -> Any:
        deadline = time.monotonic() + 30
        while True:
            try:
                handle = spawn_worker(
                    settings=self.worker_settings, device_class="cpu", profile=self.profile,
                    name=self.name(i), timeout_s=120, resources=self.resources(i),
                )
                break
            except ValueError:  # the dead worker's name is not released yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ray.get(handle.preload.remote("tiny"), timeout=120)
        return handle


def _broken_model(tiny_models: TinyModels, root: Path) -> Path:
    """A models file adding "tiny-broken": the tiny pipeline with its UNet weights corrupted,
    so every worker fails to load it (the job is nobody's fault but never runs)."""
    broken = root / "tiny-broken"
    shutil.copytree(tiny_models.sd15, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    models_file = root / "models.toml"
    models_file.write_text(
        "[models.tiny-broken]\n"
        f'path = "{broken}"\n'
        'family = "sd15"\n'
        "min_vram_gb = 0\n"
        "max_steps = 50\n"
        'scheduler = "Euler"\n'
    )
    return models_file


@pytest.fixture(scope="module")
def ray_nodes(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayNodes]:
    models_file = _broken_model(tiny_models, tmp_path_factory.mktemp("faults"))
    worker_settings = tiny_models.settings.model_copy(update={"models_file": models_file})
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        # Loopback only, in this process and (inherited) in every raylet and worker; and no
        # /tmp/ray/ray_current_cluster, which would send other people's ray.init() here.
        mp.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
        cluster = RayCluster(
            initialize_head=True,
            head_node_args={
                "node_ip_address": LOOPBACK, "include_dashboard": False, "num_cpus": 0,
                "_system_config": HEALTH_CHECK,
            },
        )
        try:
            nodes = RayNodes(cluster, worker_settings.worker_config(), cpu_profile)
            for i in range(WORKERS):
                nodes.add_node(i)
            ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False)
            nodes.ensure()
            yield nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def workers(ray_nodes: RayNodes) -> RayNodes:
    ray_nodes.ensure()
    return ray_nodes


@pytest.fixture(scope="module")
def models(ray_nodes: RayNodes) -> ModelRegistry:
    """What the workers know: the packaged models (tiny among them) and "tiny-broken"."""
    return ModelRegistry.load(ray_nodes.worker_settings)


# A store, a broker and the stack a test drives ---------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        tiers={"free": Tier(daily_allowance=100, concurrency=40, max_side=1024)},
        default_tier="free",
        _env_file=None,
    )


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[Broker]:
    b = RedisBroker(redis_url, claim_idle_ms=CLAIM_IDLE_MS)
    yield b
    await b.close()


def make_stack(
    settings: Settings, engine: Engine, broker: Broker, models: ModelRegistry, name: str = "d1",
) -> Cluster:
    """A client and an in-process dispatcher that finds the workers by name, like
    ``atelier dispatcher`` does."""
    sessions = session_factory(engine)
    blobs = BlobStore.from_settings(settings)
    client = Client(
        settings=settings, session_factory=sessions, broker=broker, blobs=blobs, models=models,
        poll_interval_s=0.1,
        styles=default_registry(),
        blocklist=default_blocklist(),
    )
    pool = WorkerPool(discover=ray_discovery(WORKER_NAME_PREFIX), host_memory_gb=32)
    dispatcher = Dispatcher(
        dispatch=settings.dispatch.model_copy(update=DISPATCH_OPTIONS), sessions=sessions,
        broker=broker, blobs=blobs, workers=pool, name=name, models=models, pacing=PACING,
    )
    return Cluster(settings, sessions, broker, blobs, client, dispatcher)


@pytest.fixture
async def stack(
    settings: Settings, db_engine: Engine, broker: Broker, workers: RayNodes,
    models: ModelRegistry,
) -> AsyncIterator[Cluster]:
    c = make_stack(settings, db_engine, broker, models)
    yield c
    await c.close()


# Helpers -----------------------------------------------------------------------------------------


def rows(c: Cluster, job_ids: list[str]) -> dict[str, JobRead]:
    with c.session() as s:
        return {j: job_repo.get_job(session=s, job_id=j) for j in job_ids}


async def settled(c: Cluster, job_ids: list[str], timeout: float) -> dict[str, JobRead]:
    """The jobs' rows once every one has finished; fails naming the stragglers after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = await asyncio.to_thread(rows, c, job_ids)
        if all(j.status.finished for j in now.values()):
            return now
        if time.monotonic() > deadline:
            stuck = {j: r.status.value for j, r in now.items() if not r.status.finished}
            raise AssertionError(f"not finished within {timeout:g} s: {stuck}")
        await asyncio.sleep(0.1)


async def first_progress(c: Cluster, job_id: str, timeout: float = 90) -> None:
    """Return once ``job_id`` reports a step: it is running on a worker now."""

    async def follow() -> None:
        async with contextlib.aclosing(c.client.events(job_id)) as events:
            async for event in events:
                if event.kind is EventKind.progress:
                    return
                if event.terminal:
                    raise AssertionError(f"job {job_id} ended before a step: {event}")

    await asyncio.wait_for(follow(), timeout)


def assert_ran_or_refunded(c: Cluster, job: JobRead) -> None:
    """Succeeded: its images stored and its credits captured once, nothing released. Otherwise:
    released once, nothing captured."""
    captured = ledger_rows(c, job.id, CreditKind.capture)
    released = ledger_rows(c, job.id, CreditKind.release)
    if job.status is JobStatus.succeeded:
        with c.session() as s:
            images = list_job_images(session=s, job_id=job.id)
        assert (captured, released) == (1, 0), job
        assert len(images) == job.request.images_out, job
    else:
        assert job.status in (JobStatus.failed, JobStatus.cancelled), job
        assert (captured, released) == (0, 1), job


def assert_nothing_held(c: Cluster, *names: str) -> None:
    for name in names:
        a = audit(c, who(name))
        assert a.held == 0 and a.balanced and a.conserved, a


async def deliveries_by_job(
    redis_url: str, frontend: str = "telegram"
) -> dict[str, list[JobEvent]]:
    """The front end's delivery stream as it stands, by job (XRANGE: reads consume nothing)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = await client.xrange(keys.deliveries_stream(frontend))
    finally:
        await client.aclose()
    out: dict[str, list[JobEvent]] = {}
    for _, fields in entries:
        event = JobEvent.from_fields(fields)
        out.setdefault(event.job_id, []).append(event)
    return out


async def delivered(redis_url: str, job_ids: list[str]) -> bool:
    return set(await deliveries_by_job(redis_url)) >= set(job_ids)


async def nothing_pending(broker: Broker) -> bool:
    return await broker.jobs.pending_count() == 0 and await broker.jobs.queue_depth() == 0


async def delivered_once(
    broker: Broker, redis_url: str, job_ids: list[str], timeout: float = 30,
    *, repeats_ok: bool = False,
) -> dict[str, JobEvent]:
    """Each job's one delivery, once every job has one and no entry is left pending (a job's
    delivery is published before its entries are acked, duplicates included). ``repeats_ok``:
    a job may have several identical ones (re-announced after a broker restart; front ends
    dedupe by job id)."""
    await until(lambda: delivered(redis_url, job_ids), timeout, "deliveries missing")
    await until(lambda: nothing_pending(broker), timeout, "entries still pending")
    events = await deliveries_by_job(redis_url)
    assert sorted(events) == sorted(job_ids), events
    if repeats_ok:
        for job_id, evs in events.items():
            assert all(e == evs[0] for e in evs), (job_id, evs)
    else:
        repeated = {j: len(v) for j, v in events.items() if len(v) != 1}
        assert not repeated, f"delivered more than once: {repeated}"
    return {j: v[0] for j, v in events.items()}


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.1)


async def taken_over(c: Cluster, job_ids: list[str], since: float) -> float:
    """Seconds from ``since`` until none of the jobs runs its first attempt any more: the
    dispatcher noticed the loss and queued them again (or settled them). At most
    TAKEOVER_BOUND_S."""

    async def moved_on() -> bool:
        now = await asyncio.to_thread(rows, c, job_ids)
        return all(j.status is not JobStatus.running or j.attempts > 1 for j in now.values())

    await until(moved_on, TAKEOVER_BOUND_S - (time.monotonic() - since), "no takeover")
    return time.monotonic() - since


# A job that fails on every worker -----------------------------------------------------------------


async def test_a_job_failing_on_every_worker_is_dead_lettered_and_refunded(
    stack: Cluster, redis_url: str
) -> None:
    alice, bob = who("alice"), who("bob")
    poison = await submit(stack, bob, req(model="tiny-broken"))
    good = [await submit(stack, alice, req(seed=n)) for n in range(3)]
    stack.start()
    ids = [poison.job_id, *(g.job_id for g in good)]
    jobs = await settled(stack, ids, timeout=FINISH_BOUND_S)

    # The poison job: tried max_attempts times, then failed, refunded and dead-lettered.
    bad = jobs[poison.job_id]
    assert bad.status is JobStatus.failed and bad.attempts == MAX_ATTEMPTS
    assert bad.error is not None and f"gave up after {MAX_ATTEMPTS} attempts" in bad.error
    assert "tiny-broken" in bad.error
    # What its owner reads names the model but none of the server's paths or internals (the
    # corrupt file's path and the loader's exception text are in the operator log only).
    assert "could not be loaded on the worker; the operator has been told" in bad.error
    assert "/" not in bad.error and "Error" not in bad.error, bad.error
    b = audit(stack, bob)
    assert b.released == poison.cost and b.captured == 0 and b.held == 0
    # The row is settled first; the dead-letter entry follows the delivery (settle, announce,
    # then dead-letter instead of ack): wait for it a little.
    deadline = time.monotonic() + 15
    while not (dead := await stack.broker.jobs.dead_letters(10)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert [d["job_id"] for d in dead] == [poison.job_id]
    assert f"gave up after {MAX_ATTEMPTS} attempts" in dead[0]["reason"]
    # The others ran once each, as if nothing happened; no worker was taken for dead.
    for g in good:
        assert jobs[g.job_id].status is JobStatus.succeeded and jobs[g.job_id].attempts == 1
    for job in jobs.values():
        assert_ran_or_refunded(stack, job)
    assert audit(stack, alice).captured == sum(g.cost for g in good)
    assert all(s.alive for s in stack.dispatcher.workers.slots)
    # One delivery each; the poison job's says why.
    events = await delivered_once(stack.broker, redis_url, ids)
    end = events[poison.job_id]
    assert end.kind is EventKind.failed and end.reason and "tiny-broken" in end.reason
    assert end.reason == bad.error


# Redis killed and restarted, or frozen, under load ------------------------------------------------


async def test_redis_killed_and_restarted_under_load_loses_no_job(
    private_redis: RedisServer, settings: Settings, db_engine: Engine, workers: RayNodes,
    models: ModelRegistry,
) -> None:
    """The restart loses every stream, so the store is what brings the jobs back. Redis stays
    down until the jobs read before the crash have run and settled, so their deliveries wait
    out the outage."""
    server = private_redis
    broker = RedisBroker(server.url, claim_idle_ms=CLAIM_IDLE_MS)
    c = make_stack(settings, db_engine, broker, models)
    people = [f"user{n}" for n in range(5)]
    # Two jobs a batch on two workers: of the six read before the crash, two wait in the
    # dispatcher for a free worker, and must still run while Redis is down.
    c.dispatcher.max_batch_items = 2
    try:
        c.start()
        before = [await submit(c, who(people[n % 5]), req(seed=n, **MEDIUM)) for n in range(6)]
        await first_progress(c, before[0].job_id)
        await all_read(server.url)  # "before": every one is in the dispatcher's hands
        deadline = time.monotonic() + 10
        while len(c.dispatcher.running) + c.dispatcher.queued < len(before):
            assert time.monotonic() < deadline, "the dispatcher did not admit every job"
            await asyncio.sleep(0.02)
        assert c.dispatcher.queued >= 2  # held, not started, when Redis goes
        killed = utcnow()
        kill_redis(server)
        # Accepted while Redis is down: charged and stored, queued by the reconciler later.
        during = [await submit(c, who(people[n % 5]), req(seed=10 + n)) for n in range(4)]
        assert all(s.created and s.status is JobStatus.queued for s in during)
        subs: list[SubmittedJob] = [*before, *during]
        ids = [s.job_id for s in subs]
        # The jobs read before the crash run and are settled in the store with Redis down.
        await settled(c, [s.job_id for s in before], timeout=FINISH_BOUND_S)
        server.start()
        restarted, t0 = utcnow(), time.monotonic()
        jobs = await settled(c, ids, timeout=FINISH_BOUND_S)
        log.info("Redis restart: every job finished %.1f s after Redis came back",
                 time.monotonic() - t0)

        for job in jobs.values():
            assert_ran_or_refunded(c, job)
        assert [j.status for j in jobs.values()] == [JobStatus.succeeded] * len(subs)
        assert_nothing_held(c, *people)
        # Settled during the outage and after it. (One settled just before the kill, which a
        # loaded machine can make happen, lost its delivery with Redis; the restart's
        # re-announcement brings it back, so the checks below hold for it too.)
        finished = sorted(j.finished_at for j in jobs.values() if j.finished_at is not None)
        assert len(finished) == len(subs) and finished[0] < restarted < finished[-1]
        log.info("Redis restart: %d jobs settled while Redis was down",
                 sum(killed < f < restarted for f in finished))
        # Nothing left pending either: re-enqueued duplicates of running jobs were acked. The
        # restart re-announces every job no front end marked delivered, so a delivery published
        # between the restart and the dispatcher noticing it comes twice (front ends dedupe).
        events = await delivered_once(broker, server.url, ids, repeats_ok=True)
        assert all(e.kind is EventKind.done for e in events.values())

        # A delivery published and then lost with Redis before its front end read it comes
        # back; one the front end marked delivered does not.
        kept, lost = ids[: len(ids) // 2], ids[len(ids) // 2 :]
        for job_id in kept:
            assert await c.client.mark_delivered(job_id) is True
        kill_redis(server)
        server.start()
        await until(lambda: delivered(server.url, lost), FINISH_BOUND_S, "not re-announced")
        assert await c.broker.server_epoch() == c.dispatcher._epoch
        await asyncio.sleep(1.0)  # a few more epoch checks and reconcile passes
        again = await deliveries_by_job(server.url)
        assert set(lost) <= set(again), again
        for job_id in lost:
            assert again[job_id] == [events[job_id]]
        # A kept one comes back only from a pass that read it undelivered just before it was
        # marked and whose publish then waited out the restart (a loaded machine makes that
        # window real): its front end drops it, since the job is marked delivered already.
        for job_id in set(again) - set(lost):
            assert job_id in kept, again
            assert await c.client.mark_delivered(job_id) is False
    finally:
        await c.close()
        await broker.close()


async def test_a_frozen_redis_holds_up_deliveries_not_batches(
    private_redis: RedisServer, settings: Settings, db_engine: Engine, workers: RayNodes,
    models: ModelRegistry,
) -> None:
    """Redis stopped (SIGSTOP: connections open, no answers, each call waiting out its socket
    timeout, a hung server or a partition): the running batches still finish and are settled
    in the store; progress ticks are dropped and deliveries wait for Redis to come back."""
    server = private_redis
    assert server.proc is not None
    broker = RedisBroker(server.url, claim_idle_ms=CLAIM_IDLE_MS)
    c = make_stack(settings, db_engine, broker, models)
    people = ("alice", "bob")
    try:
        subs = [await submit(c, who(people[n % 2]), req(seed=n, **LONG)) for n in range(4)]
        ids = [s.job_id for s in subs]
        c.start()
        await first_progress(c, ids[0])
        server.proc.send_signal(signal.SIGSTOP)
        try:
            jobs = await settled(c, ids, timeout=FINISH_BOUND_S)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        for job in jobs.values():
            assert job.status is JobStatus.succeeded and job.attempts == 1
            assert_ran_or_refunded(c, job)
        assert_nothing_held(c, *people)
        events = await delivered_once(broker, server.url, ids, timeout=FINISH_BOUND_S)
        assert all(e.kind is EventKind.done for e in events.values())
    finally:
        await c.close()
        await broker.close()


# A dispatcher process killed mid-batch -----------------------------------------------------------


def start_dispatcher_process(
    workers: RayNodes, settings: Settings, db_url: str, redis_url: str, log_file: Path
) -> subprocess.Popen[bytes]:
    """``python -m atelier.serve`` (a dispatcher) against the same Redis, store and Ray cluster."""
    env = os.environ | {
        "ATELIER_DISPATCH__WORKER_LEASE_S": str(ORPHAN_LEASE_S),
        "ATELIER_DATA_DIR": str(settings.data_dir),
        "ATELIER_DATABASE_URL": db_url,
        "ATELIER_REDIS_URL": redis_url,
        "ATELIER_MODELS_FILE": str(workers.worker_settings.models_file),
        ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0",  # loopback, like the cluster
    }
    with log_file.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable, "-m", "atelier.serve", "--name", "dproc",
                "--ray-address", workers.address, "--claim-idle-ms", str(CLAIM_IDLE_MS),
            ],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_dispatcher_process_killed_mid_batch_is_reclaimed_and_delivered_once(
    stack: Cluster, workers: RayNodes, db_url: str, redis_url: str, tmp_path: Path
) -> None:
    people = ("alice", "bob", "carol")
    # Long enough (~3x the lease at least) that the orphaned batch cannot just finish.
    subs = [await submit(stack, who(p), req(seed=n, **ORPHAN_JOB)) for n, p in enumerate(people)]
    ids = [s.job_id for s in subs]
    stopped_before = await orphans_stopped(workers)
    log_file = tmp_path / "dproc.log"
    proc = start_dispatcher_process(workers, stack.settings, db_url, redis_url, log_file)
    try:
        await first_progress(stack, ids[0])
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = log_file.read_text(errors="replace")
    assert "batch on" in output, output[-3000:]
    # Ray runs an actor call on after its caller died: the worker stops the orphaned batch
    # itself once the dead dispatcher's lease renewals stop, so the rerun below does not
    # share the device with it.
    deadline = killed + ORPHAN_LEASE_S + ORPHAN_STOP_BOUND_S
    while (stopped := await orphans_stopped(workers)) == stopped_before:
        assert time.monotonic() < deadline, "the orphaned batch was not stopped"
        await asyncio.sleep(0.1)
    log.info("dispatcher killed: its orphaned batch stopped after %.1f s",
             time.monotonic() - killed)
    assert stopped == stopped_before + 1
    assert not await busy_jobs(workers)
    # Killed mid-batch: the jobs are running (one attempt each), their entries pending on the
    # dead consumer, nothing delivered.
    jobs = await asyncio.to_thread(rows, stack, ids)
    assert [(j.status, j.attempts) for j in jobs.values()] == [(JobStatus.running, 1)] * 3
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pending = await client.xpending_range(
            keys.JOBS_STREAM, keys.DISPATCHER_GROUP, "-", "+", 10
        )
    finally:
        await client.aclose()
    assert sorted(p["consumer"] for p in pending) == ["dproc"] * 3
    assert not await deliveries_by_job(redis_url)

    # A second dispatcher claims the entries once they are idle for the claim timeout, and
    # finishes the jobs: one more attempt each, captured once, delivered once.
    stack.start()
    jobs = await settled(stack, ids, timeout=FINISH_BOUND_S)
    [rerun] = stack.dispatcher.batches
    assert sorted(rerun.job_ids) == sorted(ids)
    reclaimed, finished = rerun.started - killed, time.monotonic() - killed
    log.info("dispatcher killed: jobs claimed and placed again after %.1f s, finished after "
             "%.1f s", reclaimed, finished)
    assert CLAIM_IDLE_MS / 1000 - 1 <= reclaimed <= CLAIM_IDLE_MS / 1000 + TAKEOVER_BOUND_S
    assert [(j.status, j.attempts) for j in jobs.values()] == [(JobStatus.succeeded, 2)] * 3
    for job in jobs.values():
        assert_ran_or_refunded(stack, job)
    for s, p in zip(subs, people, strict=True):
        a = audit(stack, who(p))
        assert a.captured == s.cost and a.released == 0 and a.held == 0
    events = await delivered_once(stack.broker, redis_url, ids)
    assert all(e.kind is EventKind.done for e in events.values())


async def all_read(redis_url: str, timeout: float = 30) -> None:
    """Return once the dispatchers' group has been handed every entry of the jobs stream."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            stream = await client.xinfo_stream(keys.JOBS_STREAM)
            groups = await client.xinfo_groups(keys.JOBS_STREAM)
            group = next(g for g in groups if g["name"] == keys.DISPATCHER_GROUP)
            if group["last-delivered-id"] == stream["last-generated-id"]:
                return
            assert time.monotonic() < deadline, "the dispatcher did not read every entry"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def orphans_stopped(workers: RayNodes) -> int:
    """Batches the workers stopped because their caller's lease renewals stopped."""
    healths = [await h.health.remote() for h in workers.handles.values()]
    return sum(int(h["orphans_stopped"]) for h in healths)


async def busy_jobs(workers: RayNodes) -> list[str]:
    return [j for h in workers.handles.values() for j in (await h.health.remote())["jobs"]]


# A worker killed mid-job; a node removed mid-run (these take workers away: last) -----------------


async def test_a_worker_killed_mid_job_is_retried_on_the_other_node_and_charged_once(
    stack: Cluster, workers: RayNodes, redis_url: str
) -> None:
    alice = who("alice")
    stack.start()
    sub = await submit(stack, alice, req(count=2, **LONG))
    await first_progress(stack, sub.job_id)
    [batch] = stack.dispatcher.batches
    pid = (await workers.handle(batch.worker_id).health.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    moved = await taken_over(stack, [sub.job_id], killed)
    [job] = (await settled(stack, [sub.job_id], timeout=FINISH_BOUND_S)).values()
    log.info("worker killed: its job queued again after %.1f s, finished after %.1f s",
             moved, time.monotonic() - killed)
    assert job.status is JobStatus.succeeded and job.attempts == 2
    first, second = stack.dispatcher.batches
    assert first.worker_id == batch.worker_id and second.worker_id != batch.worker_id
    lost = stack.dispatcher.workers.get(batch.worker_id)
    assert lost is not None and not lost.alive and lost.lost_reason
    assert_ran_or_refunded(stack, job)
    a = audit(stack, alice)
    assert a.captured == sub.cost and a.released == 0 and a.held == 0
    end = (await delivered_once(stack.broker, redis_url, [sub.job_id]))[sub.job_id]
    assert end.kind is EventKind.done and len(end.images) == 2


async def test_a_node_removed_mid_run_loses_no_job_within_the_bound(
    stack: Cluster, workers: RayNodes, redis_url: str
) -> None:
    people = ("alice", "bob")
    stack.dispatcher.max_batch_items = 2
    subs = [await submit(stack, who(people[n % 2]), req(seed=n, **LONG)) for n in range(4)]
    ids = [s.job_id for s in subs]
    stack.start()  # after submitting: the first read takes all four, two batches of two
    await asyncio.gather(*(first_progress(stack, j) for j in ids))
    batches = list(stack.dispatcher.batches)
    assert sorted(b.worker_id for b in batches) == [workers.name(i) for i in range(WORKERS)]
    victim, survivor = batches
    gone = sorted(victim.job_ids)
    running = await asyncio.to_thread(rows, stack, ids)
    assert {j.status for j in running.values()} == {JobStatus.running}

    removed = time.monotonic()
    await asyncio.to_thread(workers.remove_node, workers.index(victim.worker_id))
    moved = await taken_over(stack, gone, removed)
    jobs = await settled(stack, ids, timeout=FINISH_BOUND_S)
    finished = time.monotonic() - removed
    log.info("node removed: its jobs queued again after %.1f s, all finished after %.1f s",
             moved, finished)
    assert finished <= FINISH_BOUND_S

    # The removed node's jobs ran again on the survivor; the survivor's ran once.
    for job in jobs.values():
        assert job.status is JobStatus.succeeded
        assert job.attempts == (2 if job.id in gone else 1), job
        assert_ran_or_refunded(stack, job)
    reruns = [b for b in stack.dispatcher.batches if set(b.job_ids) & set(gone)][1:]
    assert reruns and all(b.worker_id == survivor.worker_id for b in reruns)
    lost = stack.dispatcher.workers.get(victim.worker_id)
    assert lost is not None and not lost.alive
    assert_nothing_held(stack, *people)
    events = await delivered_once(stack.broker, redis_url, ids)
    assert all(e.kind is EventKind.done for e in events.values())
