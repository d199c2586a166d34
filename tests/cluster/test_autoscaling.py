"""Autoscaling from the queue on a Ray cluster with an autoscaler and a fake node provider:
two node types offering different device classes, both at zero. Jobs queued for one class
make the dispatcher ask for that class's bundles; the autoscaler starts a node of that type
(and not of the other), the dispatcher starts a worker on it and the jobs run; once the queue
has drained the worker is stopped, the request withdrawn, and the node removed: back to zero
within a bounded time."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray._private import ray_constants

from atelier.app import make_client, make_dispatcher
from cluster.broker_memory import MemoryBroker
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Pacing
from cluster.placement import WorkerPool, ray_discovery
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from core.settings import load_settings
from engine.devices import DeviceProfile
from storage.db import make_engine, session_factory, upgrade
from testing.ray_cluster import FakeAutoscalingCluster
from tests.cluster.conftest import TinyModels

SMALL, BIG = "t4-16gb", "a100-80gb"
NODE_TYPES = {
    "gpu-16g": {"resources": {"CPU": 1, "GPU": 1, f"device:{SMALL}": 1},
                "node_config": {}, "min_workers": 0, "max_workers": 2},
    "gpu-80g": {"resources": {"CPU": 1, "GPU": 1, f"device:{BIG}": 1},
                "node_config": {}, "min_workers": 0, "max_workers": 2},
}
SCALE_UP_S = 240
SCALE_DOWN_S = 180


@pytest.fixture
def fake_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeAutoscalingCluster]:
    if ray.is_initialized():
        ray.shutdown()
    cluster = FakeAutoscalingCluster(tmp_path, NODE_TYPES, idle_timeout_minutes=0.05)
    cluster.start()
    try:
        cluster.wait_for_head()
        # This driver on loopback too, as the nodes (see cluster.contract.init_local_ray).
        monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the head (testing/ray_cluster.py)
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


def device_nodes() -> dict[str, int]:
    """Alive nodes per device class."""
    out: dict[str, int] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        for key in node["Resources"]:
            if key.startswith("device:"):
                out[key.removeprefix("device:")] = out.get(key.removeprefix("device:"), 0) + 1
    return out


@pytest.mark.slow
@pytest.mark.timeout(SCALE_UP_S + SCALE_DOWN_S + 120)  # a loaded machine: nodes start slowly
async def test_queued_jobs_scale_their_class_from_zero_and_back(
    fake_cluster: FakeAutoscalingCluster, tiny_models: TinyModels, tmp_path: Path,
    cpu_profile: DeviceProfile,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(db_url)
    settings = load_settings(
        data_dir=tiny_models.data_dir, database_url=db_url, _env_file=None,
        autoscale={
            "enabled": True, "latency_target_s": 30, "interval_s": 1, "idle_release_s": 2,
            "classes": {SMALL: {"memory_gb": 16, "run_s": 5, "max_workers": 2},
                        BIG: {"memory_gb": 80, "run_s": 5, "max_workers": 2}},
        },
    )

    def profile_for(device_class: str) -> DeviceProfile:
        # The fake nodes' "GPUs" are this CPU: the tiny model runs on it under their class.
        return dataclasses.replace(cpu_profile, device_class=device_class, threads=1)

    assert device_nodes() == {}
    engine = make_engine(db_url)
    broker = MemoryBroker()
    sessions = session_factory(engine)
    pool = WorkerPool(discover=ray_discovery(WORKER_NAME_PREFIX), info_timeout_s=30)
    dispatcher = make_dispatcher(
        settings, sessions, broker, pool, name="d-autoscale", profile_for=profile_for,
        pacing=Pacing(refresh_interval_s=1, heartbeat_s=5),
    )
    assert dispatcher.autoscaler is not None
    client = make_client(settings, sessions, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        request = GenerationRequest(prompt="a fox", model="tiny", width=64, height=64,
                                    steps=2, scheduler="Euler")
        began = time.monotonic()
        jobs = [
            await client.submit(request, Requester(platform="web", platform_user_id=f"u{i}"),
                                DeliveryTarget(frontend="web"), uuid.uuid4().hex)
            for i in range(3)
        ]
        events = await asyncio.wait_for(
            asyncio.gather(*(client.wait(j.job_id) for j in jobs)), SCALE_UP_S
        )
        assert [e.kind for e in events] == ["done"] * 3, events
        up_s = time.monotonic() - began
        nodes = device_nodes()
        assert nodes.get(SMALL, 0) >= 1 and BIG not in nodes, nodes
        # Every batch ran on a worker of the class the jobs needed.
        assert {b.worker_id.split("-")[2] for b in dispatcher.batches} == {"t4"}

        # Drained: the request is withdrawn, the worker stopped, the node removed.
        drained = time.monotonic()
        while device_nodes():
            if time.monotonic() - drained > SCALE_DOWN_S:
                pytest.fail(f"still {device_nodes()} nodes {SCALE_DOWN_S}s after draining")
            await asyncio.sleep(1)
        down_s = time.monotonic() - drained
        assert dispatcher.autoscaler.wanted == {SMALL: 0, BIG: 0}
        assert dispatcher.autoscaler.started == {}
        print(f"scale-up to done {up_s:.0f}s, scale-down {down_s:.0f}s")  # noqa: T201
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await broker.close()
        engine.dispose()


def _requested() -> list[dict[str, float]]:
    """The request Ray's (v1) autoscaler acts on: one KV entry, the last call's bundles."""
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@pytest.mark.slow
@pytest.mark.timeout(SCALE_UP_S + 120)
async def test_two_dispatchers_scale_both_classes_with_one_demand(
    fake_cluster: FakeAutoscalingCluster, tiny_models: TinyModels, tmp_path: Path,
    cpu_profile: DeviceProfile,
) -> None:
    """d-small holds the jobs of the small model (its read-ahead window is full), d-big those
    of a model only the big class fits. Each asks Ray for the sum of both demands, so both
    node types come up and every job runs on its class: not only the last asker's."""
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        "[models.tiny-big]\n"
        f'path = "{tiny_models.sd15}"\n'
        'family = "sd15"\n'
        "min_vram_gb = 40\n"
        "max_steps = 50\n"
        'scheduler = "Euler"\n'
    )
    db_url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(db_url)
    settings = load_settings(
        data_dir=tiny_models.data_dir, database_url=db_url, models_file=models_file,
        _env_file=None,
        autoscale={
            "enabled": True, "latency_target_s": 30, "interval_s": 1, "idle_release_s": 2,
            "classes": {SMALL: {"memory_gb": 16, "run_s": 5, "max_workers": 2},
                        BIG: {"memory_gb": 80, "run_s": 5, "max_workers": 2}},
        },
    )

    def profile_for(device_class: str) -> DeviceProfile:
        vram = {SMALL: 16, BIG: 80}[device_class]
        return dataclasses.replace(cpu_profile, device_class=device_class, threads=1,
                                   vram_gb=vram)

    engine = make_engine(db_url)
    broker = MemoryBroker()
    sessions = session_factory(engine)
    client = make_client(settings, sessions, broker)

    async def submit(model: str, n: int) -> list[str]:
        request = GenerationRequest(prompt="a fox", model=model, width=64, height=64,
                                    steps=2, scheduler="Euler")
        return [(await client.submit(request, Requester(platform="web",
                                                        platform_user_id=f"{model}{i}"),
                                     DeliveryTarget(frontend="web"), uuid.uuid4().hex)).job_id
                for i in range(n)]

    def dispatcher(name: str, window: int) -> Any:
        pool = WorkerPool(discover=ray_discovery(WORKER_NAME_PREFIX), info_timeout_s=30)
        return make_dispatcher(
            settings, sessions, broker, pool, name=name, profile_for=profile_for,
            pacing=Pacing(refresh_interval_s=1, heartbeat_s=5, window=window),
        )

    small, big = dispatcher("d-small", 2), dispatcher("d-big", 8)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(small.run(stop))]
    try:
        small_jobs = await submit("tiny", 2)
        while small.queued_by_class().get(SMALL, 0) < 2:  # d-small holds both, window full
            await asyncio.sleep(0.2)
        tasks.append(asyncio.create_task(big.run(stop)))
        big_jobs = await submit("tiny-big", 2)
        seen_union = False
        waiting = asyncio.gather(*(client.wait(j) for j in small_jobs + big_jobs))
        began = time.monotonic()
        while not waiting.done():
            asked = {k for b in _requested() for k in b if k.startswith("device:")}
            seen_union |= asked == {f"device:{SMALL}", f"device:{BIG}"}
            if time.monotonic() - began > SCALE_UP_S:
                waiting.cancel()
                pytest.fail(f"not done in {SCALE_UP_S}s; nodes {device_nodes()}, "
                            f"asked {_requested()}")
            await asyncio.sleep(0.5)
        events = waiting.result()
        assert [e.kind for e in events] == ["done"] * 4, events
        assert seen_union  # the one request Ray keeps held both classes at once
        ran = {b.model: {b.worker_id.split("-")[2] for b in d.batches}
               for d in (small, big) for b in d.batches}
        assert ran == {"tiny": {"t4"}, "tiny-big": {"a100"}}, ran
        print(f"both classes up and 4 jobs done in {time.monotonic() - began:.0f}s")  # noqa: T201
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await broker.close()
        engine.dispose()
