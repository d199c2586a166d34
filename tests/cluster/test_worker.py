"""Worker actors on a real local Ray (loopback): device-class placement, streamed progress,
cancellation, refusal of an unknown class, and a SIGKILLed worker surfacing as WorkerLost."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
import ray
import ray.exceptions as rex

from cluster.contract import (
    BatchItem,
    GenerationCancelled,
    NoWorkerForClass,
    WorkerFailed,
    WorkerInfo,
    WorkerLost,
    init_local_ray,
    run_batch,
)
from core.request import GenerationRequest
from engine.actor import WORKER_ENV, spawn_worker
from engine.devices import DeviceProfile

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

TIMEOUT_S = 60


def request(**fields: object) -> GenerationRequest:
    base: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "model": "tiny",
        "width": 64,
        "height": 64,
        "steps": 3,
        "seed": 11,
    }
    return GenerationRequest(**(base | fields))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    init_local_ray(
        num_cpus=2,
        resources={"device:cpu": 1, "device:fake-gpu": 1},
        object_store_memory=200 * 1024 * 1024,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workers(local_ray: None, tiny_models: TinyModels, cpu_profile: DeviceProfile) -> dict[str, Any]:
    """A "cpu" worker that detects its device and a "fake-gpu" one given a profile."""
    fake = dataclasses.replace(cpu_profile, device_class="fake-gpu")
    settings = tiny_models.settings
    with ThreadPoolExecutor(2) as pool:  # both start at once: actor start-up dominates
        cpu = pool.submit(spawn_worker, settings=settings, device_class="cpu", name="test-cpu")
        gpu = pool.submit(
            spawn_worker, settings=settings, device_class="fake-gpu", profile=fake, num_gpus=0
        )
        return {"cpu": cpu.result(), "fake-gpu": gpu.result()}


async def test_each_device_class_serves_a_batch_with_progress(workers: dict[str, Any]) -> None:
    for device_class, handle in workers.items():
        info: WorkerInfo = await handle.info.remote()
        assert info.device_class == device_class and info.profile["device_class"] == device_class
        assert info.max_batch_pixels > 0 and not info.busy and info.node_id
        # What this node can load (offline: the shipped demo model and the built tiny ones,
        # no hub repo).
        assert info.loadable_models == ["demo", "tiny", "tiny-xl"]
        node = next(n for n in ray.nodes() if n["NodeID"] == info.node_id)
        assert node["NodeManagerAddress"] == "127.0.0.1"  # pinned to loopback

        steps: list[tuple[int, int]] = []
        items = [BatchItem("a", request()), BatchItem("b", request(prompt="a cat", seed=3))]
        images = await run_batch(
            handle,
            items,
            on_progress=lambda s, t, out=steps: out.append((s, t)),
            timeout_s=TIMEOUT_S,
        )
        assert [(r.job_id, r.seed) for r in images] == [("a", 11), ("b", 3)]
        assert images[0].png.startswith(b"\x89PNG")
        assert steps == [(1, 3), (2, 3), (3, 3)]  # streamed while generating
        assert (await handle.info.remote()).loaded_models == ["tiny"]


async def test_a_worker_receives_no_secrets(
    local_ray: None, tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    """Workers may run on other machines: bot tokens and the signing key never travel there.
    Every SecretStr Ray serializes on the way to the actor is recorded here, in the driver."""
    from pydantic import SecretStr

    settings = tiny_models.settings.model_copy(update={
        "telegram_token": SecretStr("123456:tg-SECRET"),
        "discord_token": SecretStr("dc-SECRET"),
        "signing_key": SecretStr("sk-SECRET" * 5),
    })
    sent: list[str] = []

    def record(secret: SecretStr) -> str:
        sent.append(secret.get_secret_value())
        return "seen"

    ray.util.register_serializer(SecretStr, serializer=record, deserializer=SecretStr)
    try:
        handle = spawn_worker(
            settings=settings, device_class="cpu", profile=cpu_profile,
            name="test-no-secrets", resources={}, num_cpus=0, timeout_s=TIMEOUT_S,
        )
    finally:
        ray.util.deregister_serializer(SecretStr)
    try:
        assert sent == []
        health = await handle.health.remote()
        assert health["config"] == {
            "data_dir": str(settings.data_dir), "models_file": None, "blocklist_file": None,
            "log_format": "text", "log_level": "INFO",
        }
        assert "SECRET" not in repr(health)
    finally:
        ray.kill(handle)


async def test_unknown_device_class_is_refused_quickly(
    local_ray: None, tiny_models: TinyModels
) -> None:
    started = time.monotonic()
    with pytest.raises(NoWorkerForClass, match=r"'a100-80gb'; available: cpu, fake-gpu"):
        spawn_worker(settings=tiny_models.settings, device_class="a100-80gb", timeout_s=5)
    assert time.monotonic() - started < 5


async def test_cancel_mid_batch_then_worker_runs_normally(workers: dict[str, Any]) -> None:
    handle = workers["cpu"]
    first_step = asyncio.Event()
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        first_step.set()

    task = asyncio.create_task(
        run_batch(
            handle,
            [BatchItem("slow", request(steps=150, width=128, height=128))],
            on_progress=progress,
            timeout_s=TIMEOUT_S,
        )
    )
    await asyncio.wait_for(first_step.wait(), TIMEOUT_S)
    # Served while the batch runs (the actor takes more than one call at a time).
    assert (await handle.health.remote())["jobs"] == ["slow"]
    assert await handle.cancel.remote("slow") is True
    with pytest.raises(GenerationCancelled):
        await task
    assert steps[-1] < 150  # stopped early (the engine tests pin it to the very next step)
    assert await handle.cancel.remote("slow") is False  # no longer held

    images = await run_batch(handle, [BatchItem("after", request())], timeout_s=TIMEOUT_S)
    assert len(images) == 1 and not (await handle.info.remote()).busy
    assert (await handle.health.remote())["cache"]["loads"] == 1  # every batch reused the model


async def test_a_batch_whose_caller_stops_renewing_its_lease_is_stopped(
    workers: dict[str, Any],
) -> None:
    handle = workers["cpu"]
    before = (await handle.health.remote())["orphans_stopped"]
    slow = request(steps=150, width=128, height=128)
    # A caller that lives renews the lease: a batch many leases long runs to its end.
    started = time.monotonic()
    images = await run_batch(handle, [BatchItem("kept", slow)], timeout_s=TIMEOUT_S, lease_s=0.3)
    took = time.monotonic() - started
    assert len(images) == 1 and took > 3 * 0.3, took  # it did outlive several leases
    assert (await handle.health.remote())["orphans_stopped"] == before

    # What a dead caller's batch looks like to the worker: a lease nobody renews. (Ray runs
    # an actor call on after its caller is gone.) Stopped at the next step after it lapses.
    stream = handle.generate.remote([BatchItem("orphan", slow)], "orphan-batch", 0.3)
    events = [await ref async for ref in stream]
    assert events[-1]["type"] == "lease_lapsed", events[-1]
    assert events[-2]["step"] < 150
    health = await handle.health.remote()
    assert health["orphans_stopped"] == before + 1 and health["jobs"] == []
    # A caller whose renewals do not get through hears why its batch stopped: WorkerLost
    # with reason "lease" (the dispatcher retries the jobs and keeps using the worker).
    class Mute:
        generate = handle.generate
        renew = type("M", (), {"remote": staticmethod(lambda *a: _Stream(TimeoutError()))})()

    with pytest.raises(WorkerLost, match="lease lapsed") as info:
        await run_batch(Mute(), [BatchItem("muted", slow)], timeout_s=TIMEOUT_S, lease_s=0.3)
    assert info.value.reason == "lease"
    health = await handle.health.remote()
    assert health["orphans_stopped"] == before + 2 and health["jobs"] == []
    # The worker is fine afterwards.
    assert len(await run_batch(handle, [BatchItem("next", request())], timeout_s=TIMEOUT_S)) == 1


async def test_workers_start_with_the_malloc_settings(workers: dict[str, Any]) -> None:
    """glibc reads its malloc settings only at process start: they must be in the environment
    the worker's process was started with, not set later."""
    for handle in workers.values():
        health = await handle.health.remote()
        assert health["env"] == WORKER_ENV
        with open(f"/proc/{health['pid']}/environ", "rb") as f:
            started_with = dict(
                part.decode().split("=", 1) for part in f.read().split(b"\0") if b"=" in part
            )
        assert {k: started_with.get(k) for k in WORKER_ENV} == WORKER_ENV


async def test_job_errors_come_back_as_worker_failed(workers: dict[str, Any]) -> None:
    mixed = [BatchItem("a", request()), BatchItem("b", request(width=128))]
    with pytest.raises(WorkerFailed, match="width 64 vs 128") as info:
        await run_batch(workers["cpu"], mixed, timeout_s=TIMEOUT_S)
    assert info.value.error_code == "invalid_request"

    blocked = [BatchItem("ok", request()), BatchItem("bad", request(prompt="loli"))]
    with pytest.raises(WorkerFailed) as info:
        await run_batch(workers["cpu"], blocked, timeout_s=TIMEOUT_S)
    assert (info.value.job_id, info.value.error_code) == ("bad", "content_blocked")

    with pytest.raises(WorkerFailed, match="unknown model 'nope'"):
        await workers["fake-gpu"].preload.remote("nope")


class _Stream:
    """A stand-in for Ray's ObjectRefGenerator: hangs, or raises the given error."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        if self.error is not None:
            raise self.error
        await asyncio.sleep(3600)


class _Handle:
    def __init__(self, stream: _Stream) -> None:
        self.generate = type("M", (), {"remote": staticmethod(lambda *args: stream)})()


async def test_every_wait_is_bounded_and_ray_errors_are_classified() -> None:
    started = time.monotonic()
    with pytest.raises(WorkerLost, match="timed out after 0.2s") as info:
        await run_batch(_Handle(_Stream()), [], timeout_s=0.2)
    assert info.value.reason == "timeout" and time.monotonic() - started < 2

    cases = [
        (rex.ActorDiedError(), "died"),
        (rex.ActorUnavailableError("gone", None), "unavailable"),
        (rex.NodeDiedError("node 1 died"), "node"),
    ]
    for error, reason in cases:
        with pytest.raises(WorkerLost) as info:
            await run_batch(_Handle(_Stream(error)), [], timeout_s=1)
        assert info.value.reason == reason


async def test_sigkilled_worker_raises_worker_lost_quickly(workers: dict[str, Any]) -> None:
    """Runs last in this module: it kills the fake-gpu worker."""
    handle = workers["fake-gpu"]
    pid = (await handle.health.remote())["pid"]
    first_step = asyncio.Event()
    task = asyncio.create_task(
        run_batch(
            handle,
            [BatchItem("doomed", request(steps=50, width=256, height=256))],
            on_progress=lambda s, t: first_step.set(),
            timeout_s=TIMEOUT_S,
        )
    )
    await asyncio.wait_for(first_step.wait(), TIMEOUT_S)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLost) as info:
        await asyncio.wait_for(task, 30)
    assert info.value.reason == "died"
    assert time.monotonic() - killed < 30
