"""The whole path on real services: Client -> broker (Redis and the in-process twin) ->
Dispatcher -> a Ray CPU worker running the tiny models -> blob store + database -> deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image
from sqlalchemy import Engine, func
from sqlmodel import col, select

from cluster.broker import Broker, BrokerUnavailable
from cluster.broker_memory import MemoryBroker
from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.contract import device_resource, init_local_ray
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher, Pacing
from cluster.events import EventKind, JobEvent
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.errors import (
    Conflict,
    ContentBlocked,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    ModelUnavailable,
    RateLimited,
)
from core.jobs import JobStatus, Requester
from core.prompts import default_blocklist
from core.request import GenerationRequest, JobKind
from core.settings import Settings, Tier, load_settings
from core.styles import default_registry
from engine.actor import spawn_worker
from engine.devices import DeviceProfile
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.db import session_factory
from storage.gallery import list_job_images
from storage.models import CreditKind, CreditLedger, Job, utcnow
from tests.cluster.helpers import (
    Cluster,
    audit,
    captures,
    job_repo_account,
    mask,
    png,
    req,
    submit,
    who,
)

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

FRONTENDS = ("telegram", "discord", "web")
CLAIM_IDLE_MS = 1500


# Fixtures: Ray with one CPU worker (module), a store, a broker, a running dispatcher ----------


@pytest.fixture(scope="module")
def models_file(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, plus one no worker here can ever hold (it needs 1000 GB), plus one
    whose files are missing: the worker and the client share this file, as processes of one
    deployment share their models.toml."""
    path = tmp_path_factory.mktemp("pipeline-models") / "models.toml"
    path.write_text(
        f'[models.huge]\npath = "{tiny_models.sd15}"\nfamily = "sd15"\nmin_vram_gb = 1000\n'
        'default_width = 64\ndefault_height = 64\ndefault_steps = 4\nscheduler = "Euler"\n'
        f'[models.absent]\npath = "{tiny_models.data_dir}/models/nowhere"\nfamily = "sd15"\n'
        'hint = "build it with `atelier models make-tiny`"\n'
        f'[models.doomed]\npath = "{path.parent / "doomed"}"\nfamily = "sd15"\n'
        'default_width = 64\ndefault_height = 64\ndefault_steps = 4\nscheduler = "Euler"\n'
    )
    return path


@pytest.fixture(scope="module")
def worker(tiny_models: TinyModels, cpu_profile: DeviceProfile, models_file: Path
           ) -> Iterator[Any]:
    import ray

    init_local_ray(
        num_cpus=2, resources={device_resource("cpu"): 1}, namespace=RAY_NAMESPACE,
        log_to_driver=False,
    )
    handle = spawn_worker(
        settings=tiny_models.settings.worker_config().model_copy(
            update={"models_file": models_file}),
        device_class="cpu",
        profile=cpu_profile,
        name=f"{WORKER_NAME_PREFIX}-test",
        timeout_s=120,
    )
    ray.get(handle.preload.remote("tiny"), timeout=120)  # a fixture, not async code
    yield handle
    ray.kill(handle)
    ray.shutdown()


@pytest.fixture(params=["redis", "memory"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if request.param == "redis":
        b = RedisBroker(request.getfixturevalue("redis_url"), claim_idle_ms=CLAIM_IDLE_MS)
    else:
        b = MemoryBroker(claim_idle_ms=CLAIM_IDLE_MS)
    yield b
    await b.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        tiers={
            "free": Tier(daily_allowance=100, concurrency=40, max_side=1024),
            "tight": Tier(daily_allowance=2, concurrency=1, max_side=512),
        },
        default_tier="free",
        _env_file=None,
    )


@pytest.fixture(scope="module")
def models(tiny_models: TinyModels, models_file: Path) -> ModelRegistry:
    """What the worker knows (see ``models_file``)."""
    return ModelRegistry.load(tiny_models.settings, models_file)


@pytest.fixture
async def cluster(
    settings: Settings, db_engine: Engine, broker: Broker, worker: Any, models: ModelRegistry
) -> AsyncIterator[Cluster]:
    sessions = session_factory(db_engine)
    blobs = BlobStore.from_settings(settings)
    pool = await WorkerPool.from_handles([worker], host_memory_gb=32)
    assert len(pool.live()) == 1
    client = Client(
        settings=settings, session_factory=sessions, broker=broker, blobs=blobs, models=models,
        poll_interval_s=0.2,
        styles=default_registry(),
        blocklist=default_blocklist(),
    )
    dispatcher = Dispatcher(
        dispatch=settings.dispatch.model_copy(
            update={"gather_window_ms": 50, "job_timeout_s": 60, "max_batch_items": 4}
        ),
        sessions=sessions, broker=broker, blobs=blobs, workers=pool, name="d1", models=models,
        pacing=Pacing(progress_interval_s=0.05, cancel_poll_s=0.05, read_block_ms=100,
                      drain_timeout_s=20, reconcile_grace_s=0.0),
    )
    c = Cluster(settings, sessions, broker, blobs, client, dispatcher)
    yield c
    await c.close()


# The whole flow ----------------------------------------------------------------------------------


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_twelve_jobs_from_three_accounts(cluster: Cluster) -> None:
    alice, bob, carol = who("alice"), who("bob", "discord"), who("carol", "web")
    plan: list[tuple[Requester, str, GenerationRequest]] = [
        (alice, "telegram", req(seed=1)),
        (alice, "telegram", req(seed=2, count=2)),
        # Short prompt: the tiny models' tokenizer spends more tokens than CLIP's.
        (alice, "telegram", req(prompt="fox", seed=3, styles=("anime", "pixel-art", "manga"))),
        (alice, "telegram", req(kind=JobKind.img2img, init_image=png(seed=1), strength=0.6)),
        (bob, "discord", req(prompt="a red fox in snow")),
        (bob, "discord", req(kind=JobKind.inpaint, init_image=png(seed=2), mask=mask())),
        (bob, "discord", req(kind=JobKind.upscale, init_image=png(seed=3), width=128,
                             height=128, steps=4)),  # 4 x 0.3 strength: one denoising step
        (bob, "discord", req(prompt="a castle", negative="fog")),
        (carol, "web", req(prompt="an owl", seed=9)),
        (carol, "web", req(prompt="a ship", count=2)),
        (carol, "web", req(kind=JobKind.img2img, init_image=png(seed=4), strength=0.6)),
        (carol, "web", req(prompt="fox", styles=("photographic",))),
    ]
    cluster.start()
    submitted = [await submit(cluster, r, q, fe) for r, fe, q in plan]
    assert all(s.created and s.status is JobStatus.queued for s in submitted)
    ends = await cluster.wait_all([s.job_id for s in submitted])

    for sub, (_, frontend, request) in zip(submitted, plan, strict=True):
        end = ends[sub.job_id]
        assert end.kind is EventKind.done, (request.kind, end.reason)
        assert len(end.images) == sub.images_out == request.images_out
        assert [i.index for i in end.images] == list(range(request.images_out))
        assert end.delivery is not None and end.delivery.frontend == frontend
        # Every image stored: a row per index, its blob present and matching its hash.
        with cluster.session() as s:
            rows = list_job_images(session=s, job_id=sub.job_id)
            job = job_repo.get_job(session=s, job_id=sub.job_id)
        assert job.status is JobStatus.succeeded and job.attempts == 1
        assert job.request.seed is not None  # resolved at submit: reruns reproduce it
        assert len(rows) == request.images_out
        for row in rows:
            data = cluster.blobs.get(row.blob_key)
            assert hashlib.sha256(data).hexdigest() == row.sha256
            assert Image.open(io.BytesIO(data)).size == (request.width, request.height)
        if request.styles:
            assert [r.styles for r in rows] == [[s] for s in request.styles]
        assert captures(cluster, sub.job_id) == 1
        assert await cluster.client.job_images(sub.job_id) == list(end.images)

    # Credits: captured exactly the costs, nothing held, the ledger balanced.
    for requester in (alice, bob, carol):
        a = audit(cluster, requester)
        costs = sum(s.cost for s, (r, _, _) in zip(submitted, plan, strict=True)
                    if r == requester)
        assert a.captured == costs and a.held == 0 and a.released == 0
        assert a.balanced and a.conserved
    # Deliveries: each job's terminal event once, on its own front end's stream.
    for frontend in FRONTENDS:
        events = await cluster.deliveries(frontend)
        expected = {s.job_id for s, (_, fe, _) in zip(submitted, plan, strict=True)
                    if fe == frontend}
        assert sorted(e.job_id for e in events) == sorted(expected)
        assert all(e.kind is EventKind.done for e in events)
    # Batching happened: fewer batches than jobs.
    assert len(cluster.dispatcher.batches) < len(plan)
    # Image bytes through the client.
    first = ends[submitted[0].job_id].images[0]
    assert (await cluster.client.image_bytes(first)).startswith(b"\x89PNG")


async def test_events_tell_the_story_and_the_end_is_never_missed(cluster: Cluster) -> None:
    alice = who("alice")
    sub = await submit(cluster, alice, req(steps=20))
    seen: list[JobEvent] = []

    async def follow() -> None:
        async for event in cluster.client.events(sub.job_id):
            seen.append(event)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    cluster.start()
    await asyncio.wait_for(follower, 30)
    kinds = [e.kind for e in seen]
    assert kinds[0] is EventKind.queued and seen[0].position is not None
    assert EventKind.started in kinds and kinds[-1] is EventKind.done
    assert sum(k.terminal for k in kinds) == 1
    # Subscribing after the end still yields exactly the terminal event.
    late = [e async for e in cluster.client.events(sub.job_id)]
    assert [e.kind for e in late] == [EventKind.done] and late[0].images == seen[-1].images


async def test_repeated_idempotency_key_makes_one_job_and_one_charge(cluster: Cluster) -> None:
    alice = who("alice")
    first = await submit(cluster, alice, req(), key="tg:1:42")
    again = await submit(cluster, alice, req(prompt="something else"), key="tg:1:42")
    assert again.job_id == first.job_id and not again.created and first.created
    cluster.start()
    await cluster.wait_all([first.job_id])
    with cluster.session() as s:
        jobs = s.exec(select(Job)).all()
    assert len(jobs) == 1
    assert audit(cluster, alice).captured == first.cost
    third = await submit(cluster, alice, req(), key="tg:1:42")
    assert third.job_id == first.job_id and third.status is JobStatus.succeeded
    with pytest.raises(Conflict, match="another account"):
        await submit(cluster, who("mallory"), req(), key="tg:1:42")


async def test_cancel_before_start_releases_the_credits(cluster: Cluster) -> None:
    alice, bob = who("alice"), who("bob")
    sub = await submit(cluster, alice, req())
    assert audit(cluster, alice).held == sub.cost
    with pytest.raises(Forbidden):
        await cluster.client.cancel(sub.job_id, bob)
    assert await cluster.client.cancel(sub.job_id, alice) is JobStatus.cancelled
    a = audit(cluster, alice)
    assert a.held == 0 and a.released == sub.cost and a.captured == 0 and a.balanced
    cluster.start()
    end = await cluster.client.wait(sub.job_id)
    assert end.kind is EventKind.cancelled
    # The dispatcher drops the entry and tells the front end once; nothing ran.
    for _ in range(50):
        if await cluster.broker.jobs.pending_count() == 0 and await cluster.deliveries("telegram"):
            break
        await asyncio.sleep(0.1)
    assert not cluster.dispatcher.batches
    with pytest.raises(Conflict, match="already finished"):
        await cluster.client.cancel(sub.job_id, alice)


async def test_cancel_mid_run_releases_and_the_worker_stays_healthy(cluster: Cluster) -> None:
    alice = who("alice")
    cluster.start()
    sub = await submit(cluster, alice, req(width=256, height=256, steps=50, count=4))
    kinds = []
    async for event in cluster.client.events(sub.job_id):
        kinds.append(event.kind)
        if event.kind is EventKind.progress and event.step and event.step >= 2:
            assert await cluster.client.cancel(sub.job_id, alice) is JobStatus.running
    assert kinds[-1] is EventKind.cancelled, kinds
    a = audit(cluster, alice)
    assert a.held == 0 and a.captured == 0 and a.released == sub.cost
    with cluster.session() as s:
        assert list_job_images(session=s, job_id=sub.job_id) == []
    # The worker serves the next job.
    nxt = await submit(cluster, alice, req())
    assert (await cluster.client.wait(nxt.job_id)).kind is EventKind.done


async def test_one_account_with_thirty_jobs_does_not_starve_another(cluster: Cluster) -> None:
    alice, bob = who("alice"), who("bob")
    flood = [await submit(cluster, alice, req(seed=n)) for n in range(30)]
    single = await submit(cluster, bob, req(prompt="a single wish"))
    cluster.start()
    await cluster.wait_all([s.job_id for s in [*flood, single]], timeout=120)
    batches = list(cluster.dispatcher.batches)
    assert all(len(b.job_ids) <= 4 for b in batches)
    assert any(single.job_id in b.job_ids for b in batches[:2]), [b.job_ids for b in batches]


async def test_gathering_waits_for_a_burst_but_not_for_a_lone_job(cluster: Cluster) -> None:
    d = cluster.dispatcher
    # A long window and a generous gap, so the two behaviours cannot be told apart by luck.
    d.gather_window_s, d.gather_gap_s = 6.0, 0.5
    cluster.start()

    async def started_after(job_id: str, since: float) -> float:
        async for event in cluster.client.events(job_id):
            if event.kind is EventKind.started:
                return time.monotonic() - since
        raise AssertionError(f"job {job_id} ended without starting")

    # A lone job waits one quiet gap, not the whole window.
    since = time.monotonic()
    lone = await submit(cluster, who("alice"), req(seed=1))
    assert await asyncio.wait_for(started_after(lone.job_id, since), 30) < 3.0
    await cluster.wait_all([lone.job_id])
    # Four people submitting one after another, each within the gap: one batch of four.
    before = len(d.batches)
    burst = [await submit(cluster, who(name), req(seed=n))
             for n, name in enumerate(("bob", "carol", "dave", "erin"))]
    await cluster.wait_all([s.job_id for s in burst], timeout=60)
    shapes = [sorted(b.job_ids) for b in list(d.batches)[before:]]
    assert shapes == [sorted(s.job_id for s in burst)], shapes


async def test_a_job_no_worker_can_run_fails_at_once_and_is_refunded(cluster: Cluster) -> None:
    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    failed = sample("atelier_jobs_failed_total", reason="no_fitting_worker")
    refunded = sample("atelier_credits_refunded_total")
    alice = who("alice")
    sub = await submit(cluster, alice, req(model="huge"))
    # A second entry of the same job (a reconcile duplicate) in the same read: one failure.
    await cluster.broker.jobs.enqueue(sub.job_id)
    cluster.start()
    end = await asyncio.wait_for(cluster.client.wait(sub.job_id), 10)
    assert end.kind is EventKind.failed
    assert end.reason is not None and "huge" in end.reason and "1000" in end.reason
    a = audit(cluster, alice)
    assert a.released == sub.cost and a.held == 0 and a.captured == 0
    assert not cluster.dispatcher.batches
    # Counted once, by its reason, with its refund.
    assert sample("atelier_jobs_failed_total", reason="no_fitting_worker") == failed + 1
    assert sample("atelier_credits_refunded_total") == refunded + sub.cost
    # Both entries acked with it: nothing left pending or waiting in the queue.
    for _ in range(50):
        if not await cluster.broker.jobs.pending_count():
            break
        await asyncio.sleep(0.1)
    assert await cluster.broker.jobs.pending_count() == 0
    assert await cluster.broker.jobs.queue_depth() == 0


async def test_a_model_whose_files_vanish_fails_at_once_not_retried(
    cluster: Cluster, tiny_models: TinyModels, models_file: Path
) -> None:
    # Accepted while its folder is there; the folder is deleted before a worker loads it.
    folder = models_file.parent / "doomed"
    shutil.copytree(tiny_models.sd15, folder, dirs_exist_ok=True)
    alice = who("alice")
    sub = await submit(cluster, alice, req(model="doomed"))
    shutil.rmtree(folder)
    began = time.monotonic()
    cluster.start()
    end = await asyncio.wait_for(cluster.client.wait(sub.job_id), 30)
    took = time.monotonic() - began
    assert end.kind is EventKind.failed
    assert end.reason is not None
    assert end.reason.startswith("model 'doomed' is not available: its folder does not exist.")
    assert str(folder.parent) not in end.reason  # no server path for the person
    with cluster.session() as s:
        assert job_repo.get_job(session=s, job_id=sub.job_id).attempts == 1  # not retried
    a = audit(cluster, alice)
    assert a.released == sub.cost and a.held == 0 and a.captured == 0
    assert took < 15, took  # was 3 attempts with back-off: 60-90 s


async def test_a_poison_job_fails_alone(cluster: Cluster) -> None:
    alice, bob = who("alice"), who("bob")
    good = [await submit(cluster, alice, req(kind=JobKind.img2img, init_image=png(seed=n)))
            for n in range(2)]
    bad = await submit(cluster, bob, req(kind=JobKind.img2img, init_image=b"\x89PNG not really"))
    cluster.start()
    ends = await cluster.wait_all([s.job_id for s in [*good, bad]])
    assert [ends[s.job_id].kind for s in good] == [EventKind.done, EventKind.done]
    assert ends[bad.job_id].kind is EventKind.failed and ends[bad.job_id].reason
    b = audit(cluster, bob)
    assert b.released == bad.cost and b.captured == 0


async def test_refusals_charge_nothing_and_leave_no_job(cluster: Cluster) -> None:
    tight = who("tight-user")
    await cluster.client.account(tight)
    with cluster.session() as s:
        from storage.accounts import set_tier

        set_tier(session=s, account_id=job_repo_account(s, tight), tier="tight",
                 known_tiers=cluster.settings.tiers)
    with pytest.raises(InsufficientCredits):
        await submit(cluster, tight, req(count=4))  # 4 credits, 2 a day
    with pytest.raises(ContentBlocked):
        await submit(cluster, tight, req(prompt="nude portrait"))
    with pytest.raises(InvalidRequest, match="style"):
        await submit(cluster, tight, req(styles=("no-such-style",)))
    with pytest.raises(InvalidRequest, match="model"):
        await submit(cluster, tight, req(model="no-such-model"))
    with pytest.raises(InvalidRequest, match="width"):
        await submit(cluster, tight, req(width=1024, height=64))  # the tier's max side is 512
    with cluster.session() as s:
        assert s.exec(select(func.count()).select_from(Job)).one() == 0
    a = audit(cluster, tight)
    assert a.held == 0 and a.captured == 0 and a.released == 0
    assert (await cluster.client.balance(tight)).total == 2  # today's allowance, intact
    first = await submit(cluster, tight, req())
    with pytest.raises(RateLimited, match="1 at a time"):
        await submit(cluster, tight, req())
    assert first.created


async def test_a_model_no_worker_can_load_is_refused_at_submit_for_nothing(
    cluster: Cluster, tiny_models: TinyModels
) -> None:
    alice = who("alice")
    # 1. Before any worker has told (start-up): this machine's files stand for the workers'.
    with pytest.raises(ModelUnavailable) as err:
        await submit(cluster, alice, req(model="absent"))
    line = err.value.message
    assert line.startswith("model 'absent' is not available: its folder does not exist.")
    assert "build it with `atelier models make-tiny`" in line
    assert str(tiny_models.data_dir) not in line  # no server path
    # 2. Once the dispatcher published what its worker can load, the union of that decides.
    cluster.start()
    async with asyncio.timeout(10):
        while not await cluster.broker.registry.worker_models():
            await asyncio.sleep(0.05)
    assert await cluster.client.available_models() == ["demo", "tiny", "tiny-xl", "huge"]
    with pytest.raises(ModelUnavailable, match="'absent' is not available on any worker"):
        await submit(cluster, alice, req(model="absent"))
    # A model this machine has but no worker can load (not in the workers' models.toml).
    tiny = cluster.client.models.get("tiny")
    cluster.client.models = cluster.client.models.with_models(
        tiny.model_copy(update={"name": "only-here"}))
    with pytest.raises(ModelUnavailable, match="'only-here' is not available on any worker"):
        await submit(cluster, alice, req(model="only-here"))
    # Nothing was charged, no job row was left, and the person's next job runs.
    with cluster.session() as s:
        assert s.exec(select(func.count()).select_from(Job)).one() == 0
        assert s.exec(select(func.count()).select_from(CreditLedger).where(
            col(CreditLedger.kind) == CreditKind.reserve)).one() == 0
    ok = await submit(cluster, alice, req())
    assert (await asyncio.wait_for(cluster.client.wait(ok.job_id), 60)).kind is EventKind.done


async def test_a_job_naming_no_model_gets_the_demo_model_while_the_default_is_missing(
    cluster: Cluster,
) -> None:
    client = cluster.client
    assert (client.models.default, client.models.fallback) == ("sd15", "demo")
    # Before any worker has told: sd15 is not on this machine, the shipped demo model is.
    assert await client.default_model() == "demo"
    job = await submit(cluster, who("newcomer"), GenerationRequest(prompt="a red circle on a "
                                                                   "blue background"))
    with cluster.session() as s:
        assert job_repo.get_job(session=s, job_id=job.job_id).request.model == "demo"
    # Once a worker that can load the default has told, the default is the default again.
    await cluster.broker.registry.publish_worker_models("big-gpu", ["sd15", "demo"], ttl_s=60)
    assert await client.default_model() == "sd15"
    await cluster.broker.registry.publish_worker_models("big-gpu", ["demo"], ttl_s=60)
    assert await client.default_model() == "demo"
    # A model named is never swapped.
    named = await client.with_default_model(GenerationRequest(prompt="x", model="tiny"))
    assert named.model == "tiny"


async def test_the_model_s_defaults_apply_to_what_the_person_left_out(cluster: Cluster) -> None:
    alice = who("alice")
    # A plain prompt on the tiny model: its 64x64, 4 steps, Euler, cfg 7 (not 512x512 x 20).
    plain = await submit(cluster, alice, GenerationRequest(prompt="a fox", model="tiny"))
    own = await submit(cluster, alice, GenerationRequest(prompt="a fox", model="tiny", steps=9,
                                                         width=128))
    # A model whose defaults are large is priced on them: 1024² x 60 steps = 4 x 2 credits.
    tiny = cluster.client.models.get("tiny")
    cluster.client.models = cluster.client.models.with_models(tiny.model_copy(update={
        "name": "big-defaults", "default_width": 1024, "default_height": 1024,
        "max_width": 1024, "max_height": 1024, "default_steps": 60, "max_steps": 60,
    }))
    big = await submit(cluster, alice, GenerationRequest(prompt="a fox", model="big-defaults"))
    assert (plain.cost, own.cost, big.cost) == (1, 1, 8)
    with cluster.session() as s:
        stored = {j: job_repo.get_job(session=s, job_id=j).request
                  for j in (plain.job_id, own.job_id, big.job_id)}
    assert stored[plain.job_id].params() == (64, 64, 4, 7.0, "Euler")
    assert stored[own.job_id].params() == (128, 64, 9, 7.0, "Euler")
    assert stored[big.job_id].params()[:3] == (1024, 1024, 60)
    cluster.start()
    end = await asyncio.wait_for(cluster.client.wait(plain.job_id), 60)
    assert end.kind is EventKind.done and end.images[0].width == 64


async def test_a_job_the_broker_never_got_is_enqueued_by_the_reconciler(cluster: Cluster) -> None:
    alice = who("alice")
    real_enqueue = cluster.broker.jobs.enqueue

    async def down(job_id: str, fields: Any = None) -> str:
        raise BrokerUnavailable("Redis is restarting")

    cluster.broker.jobs.enqueue = down  # type: ignore[method-assign]
    sub = await submit(cluster, alice, req())
    cluster.broker.jobs.enqueue = real_enqueue  # type: ignore[method-assign]
    assert await cluster.broker.jobs.queue_depth() == 0
    cluster.start()  # its first reconcile finds the job the broker lacks
    assert (await asyncio.wait_for(cluster.client.wait(sub.job_id), 20)).kind is EventKind.done
    assert captures(cluster, sub.job_id) == 1


@pytest.mark.parametrize("broker", ["memory"], indirect=True)
async def test_a_delivery_retry_stops_once_the_job_is_marked_delivered(cluster: Cluster) -> None:
    """A settled job whose delivery cannot be published yet is retried, but a retry that
    wakes after the front end marked the job delivered (it got the result another way, a
    re-announcement say) must not publish a late copy."""
    alice = who("alice")
    real_publish = cluster.broker.deliveries.publish_delivery
    tries: list[str] = []
    broker_up = asyncio.Event()

    async def flaky(frontend: str, event: Any) -> str:
        tries.append(event["job_id"])
        if not broker_up.is_set():
            raise BrokerUnavailable("Redis is restarting")
        return await real_publish(frontend, event)

    cluster.broker.deliveries.publish_delivery = flaky  # type: ignore[method-assign]
    cluster.start()
    first = await submit(cluster, alice, req())
    deadline = time.monotonic() + 30
    while len(tries) < 2:  # settled, and its first retry failed too
        assert time.monotonic() < deadline, "the delivery was never tried"
        await asyncio.sleep(0.02)
    assert await cluster.client.mark_delivered(first.job_id) is True
    broker_up.set()
    second = await submit(cluster, alice, req(seed=7))  # the broker works again
    assert (await asyncio.wait_for(cluster.client.wait(second.job_id), 30)).kind is EventKind.done
    await asyncio.sleep(1.5)  # past the first job's next retry (0.2, 0.5, 1 s ...)
    assert tries.count(first.job_id) == 2  # no try after it was marked delivered
    assert [e.job_id for e in await cluster.deliveries("telegram")] == [second.job_id]


async def test_an_abandoned_entry_is_claimed_and_finished(cluster: Cluster) -> None:
    """A dispatcher that read a job and died: another claims the entry and runs it once."""
    alice = who("alice")
    sub = await submit(cluster, alice, req())
    [ghost] = await cluster.broker.jobs.read_jobs("ghost", count=1)
    with cluster.session() as s:  # the ghost had started it
        job_repo.set_status(session=s, job_id=sub.job_id, status=JobStatus.running)
    cluster.start()
    end = await asyncio.wait_for(cluster.client.wait(sub.job_id), 30)
    assert end.kind is EventKind.done and captures(cluster, sub.job_id) == 1
    assert await cluster.broker.jobs.pending_count() == 0
    with cluster.session() as s:
        assert s.exec(select(Job.attempts).where(col(Job.id) == sub.job_id)).one() == 1
    assert ghost.job_id == sub.job_id


async def test_a_restarted_dispatcher_takes_back_its_jobs_in_flight_at_once(
    settings: Settings, db_engine: Engine, redis_url: str, worker: Any, models: ModelRegistry
) -> None:
    """A service killed mid-job (kill -9: nothing settled) and started again under the same
    dispatcher name resumes the job at once, not after the claim timeout (60 s here); a job
    another live dispatcher runs is left to it."""
    claim_ms = 60_000
    sessions = session_factory(db_engine)
    blobs = BlobStore.from_settings(settings)
    broker = RedisBroker(redis_url, claim_idle_ms=claim_ms)
    pool = await WorkerPool.from_handles([worker], host_memory_gb=32)
    client = Client(settings=settings, session_factory=sessions, broker=broker, blobs=blobs,
                    models=models, poll_interval_s=0.2,
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    dispatcher = Dispatcher(
        dispatch=settings.dispatch.model_copy(
            update={"gather_window_ms": 50, "job_timeout_s": 60, "claim_timeout_ms": claim_ms}),
        sessions=sessions, broker=broker, blobs=blobs, workers=pool, name="box-up",
        models=models, pacing=Pacing(read_block_ms=100, reconcile_grace_s=0.0),
    )
    c = Cluster(settings, sessions, broker, blobs, client, dispatcher)
    alice, bob = who("alice"), who("bob")
    ours = await submit(c, alice, req())
    theirs = await submit(c, bob, req(seed=2))
    # What the killed process left: both entries pending under its name (read, not acked),
    # "ours" running under its name with a fresh lease; "theirs" since taken by another live
    # dispatcher (a duplicate entry, say) whose lease is fresh too.
    entries = await broker.jobs.read_jobs("box-up", count=2)
    assert sorted(e.job_id for e in entries) == sorted([ours.job_id, theirs.job_id])
    now = utcnow()
    with c.session() as s:
        for job_id, owner in ((ours.job_id, "box-up"), (theirs.job_id, "elsewhere")):
            job_repo.start_attempts(session=s, job_ids=[job_id], now=now,
                                    stale_before=now - timedelta(seconds=30), owner=owner)
    began = time.monotonic()
    c.start()
    try:
        end = await asyncio.wait_for(client.wait(ours.job_id), 30)
        took = time.monotonic() - began
        assert end.kind is EventKind.done, end
        assert took < claim_ms / 1000 / 3, took
        with c.session() as s:
            assert job_repo.get_job(session=s, job_id=ours.job_id).attempts == 2
            left = job_repo.get_job(session=s, job_id=theirs.job_id)
        assert captures(c, ours.job_id) == 1
        # The other dispatcher's job: not run again here (its entry acked as a duplicate).
        assert (left.status, left.attempts, left.owner) == (JobStatus.running, 1, "elsewhere")
        assert [b.job_ids for b in dispatcher.batches] == [(ours.job_id,)]
        assert await broker.jobs.pending_count() == 0
    finally:
        await c.close()
        await broker.close()


@pytest.mark.parametrize("broker", ["memory"], indirect=True)
async def test_a_lost_worker_s_job_runs_again_elsewhere_and_is_charged_once(
    cluster: Cluster, worker: Any, tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    import ray

    # A second worker on the other CPU, the only one the dispatcher knows at first.
    spare = await asyncio.to_thread(
        spawn_worker, settings=tiny_models.settings.worker_config(), device_class="cpu",
        profile=cpu_profile, name=f"{WORKER_NAME_PREFIX}-spare", timeout_s=120, resources={},
    )
    pool = cluster.dispatcher.workers = await WorkerPool.from_handles([spare], host_memory_gb=32)
    alice = who("alice")
    cluster.start()
    sub = await submit(cluster, alice, req(width=128, height=128, steps=30, count=2))
    async with contextlib.aclosing(cluster.client.events(sub.job_id)) as events:
        async for event in events:
            if event.kind is EventKind.progress:
                # Mid-run: the spare dies; the main worker joins the pool.
                await asyncio.to_thread(ray.kill, spare)
                main_info = await WorkerPool.from_handles([worker])
                pool.add(worker, main_info.slots[0].info)
                break
    end = await asyncio.wait_for(cluster.client.wait(sub.job_id), 60)
    assert end.kind is EventKind.done
    with cluster.session() as s:
        job = job_repo.get_job(session=s, job_id=sub.job_id)
    assert job.attempts == 2
    assert captures(cluster, sub.job_id) == 1 and audit(cluster, alice).captured == sub.cost
    assert [b.worker_id for b in cluster.dispatcher.batches] == [
        f"{WORKER_NAME_PREFIX}-spare", f"{WORKER_NAME_PREFIX}-test"
    ]


@pytest.mark.parametrize("broker", ["memory"], indirect=True)
async def test_account_helpers_for_front_ends(cluster: Cluster) -> None:
    tg, dc = who("ann"), who("ann#1", "discord")
    account = await cluster.client.account(tg)
    assert account.tier == "free" and (await cluster.client.balance(tg)).total == 100
    first = await submit(cluster, tg, req(prompt="first"))
    second = await submit(cluster, tg, req(prompt="second"))
    history = await cluster.client.history(tg, limit=5)
    assert [j.id for j in history] == [second.job_id, first.job_id]
    assert history[0].request.prompt == "second"
    code = await cluster.client.create_link_code(tg)
    linked = await cluster.client.redeem_link_code(dc, code.code)
    assert linked.id == account.id
    assert [j.id for j in await cluster.client.history(dc)] == [second.job_id, first.job_id]
    assert (await cluster.client.job(first.job_id)).status is JobStatus.queued
    assert await cluster.client.job_images(first.job_id) == []
