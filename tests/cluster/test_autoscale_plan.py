"""How many workers the queue needs per device class, the bundles asked of Ray, and when the
request changes (fakes for Ray's request_resources and free slots; no Ray here)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.autoscale import Autoscaler, RunTimes, bundles, class_for, plan, workers_needed
from cluster.broker import Broker
from cluster.broker_memory import MemoryBroker
from cluster.broker_redis import RedisBroker
from cluster.device_classes import class_memory_gb
from cluster.placement import WorkerPool
from cluster.registry import ModelSpec
from core.errors import ConfigError
from core.settings import Autoscale, WorkerConfig, load_settings


def config(**over: Any) -> Autoscale:
    base: dict[str, Any] = {
        "enabled": True, "latency_target_s": 30.0,
        "classes": {
            "rtx4090-24gb": {"memory_gb": 24, "run_s": 6, "max_workers": 4},
            "a100-80gb": {"memory_gb": 80, "run_s": 4, "max_workers": 2},
            "cpu": {"memory_gb": 32, "run_s": 60, "max_workers": 3, "gpus": 0},
        },
    }
    return Autoscale.model_validate(base | over)


@pytest.mark.parametrize(
    ("queued", "busy", "want"),
    [
        (0, 0, 0),  # nothing to do: no workers (the group may go to zero)
        (1, 0, 1),  # one job waits: one worker, however quick
        (5, 0, 1),  # 5 x 6 s = 30 s of work: one worker meets a 30 s target
        (6, 0, 2),  # 36 s of work: a second one
        (20, 0, 4),  # capped at max_workers
        (0, 2, 2),  # running batches keep their workers
        (6, 1, 3),
        (2, 0, 1),
    ],
)
def test_workers_needed(queued: int, busy: int, want: int) -> None:
    assert workers_needed(queued, busy, run_s=6, target_s=30, max_workers=4) == want


def test_never_more_workers_than_queued_jobs() -> None:
    assert workers_needed(2, 0, run_s=600, target_s=30, max_workers=8) == 2


def test_workers_needed_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="-1"):
        workers_needed(-1, 0, run_s=1, target_s=1, max_workers=1)


def test_a_job_goes_to_the_smallest_class_its_model_fits() -> None:
    memory = {"rtx4090-24gb": 24.0, "a100-80gb": 80.0, "cpu": 32.0}
    assert class_for(0, memory) == "rtx4090-24gb"
    assert class_for(24, memory) == "rtx4090-24gb"
    # 25-32 GB: the A100, not the CPU class because its host memory is 32 GB.
    assert class_for(30, memory) == "a100-80gb"
    assert class_for(40, memory) == "a100-80gb"
    assert class_for(81, memory) is None
    # The CPU class is the fallback the operator chose: only when no accelerator fits.
    assert class_for(30, {"rtx4090-24gb": 24.0, "cpu": 64.0}) == "cpu"
    assert class_for(0, {"cpu": 64.0}) == "cpu"


def test_a_class_is_never_credited_more_memory_than_its_card(tmp_path: Any) -> None:
    assert class_memory_gb("l4-24gb") == 24 and class_memory_gb("a100-80gb") == 80
    assert class_memory_gb("cpu") is None and class_memory_gb("mps") is None
    cfg = config(classes={"rtx4090-24gb": {"memory_gb": 32}, "cpu": {"memory_gb": 512}})
    with pytest.raises(ConfigError, match=r"'rtx4090-24gb' has memory_gb 32.*24 GB"):
        Autoscaler(cfg, worker_config=WorkerConfig(data_dir=tmp_path), prefix="w",
                   request=list, free_slots=dict)


def test_plan_and_bundles() -> None:
    cfg = config()
    wanted = plan({"a100-80gb": 3, "cpu": 1}, {"rtx4090-24gb": 1}, cfg)
    # 3 x 4 s fit one A100 in 30 s; one 60 s CPU job misses the target on any number of
    # workers, and takes only one.
    assert wanted == {"a100-80gb": 1, "cpu": 1, "rtx4090-24gb": 1}
    assert bundles(wanted, cfg) == [
        {"device:a100-80gb": 1.0, "CPU": 1.0, "GPU": 1.0},
        {"device:cpu": 1.0, "CPU": 1.0},  # a CPU class asks for no GPU
        {"device:rtx4090-24gb": 1.0, "CPU": 1.0, "GPU": 1.0},
    ]
    assert bundles(plan({}, {}, cfg), cfg) == []


def test_settings_nest_under_atelier_autoscale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_AUTOSCALE__ENABLED", "true")
    monkeypatch.setenv("ATELIER_AUTOSCALE__LATENCY_TARGET_S", "45")
    monkeypatch.setenv("ATELIER_AUTOSCALE__CLASSES", '{"a100-80gb": {"memory_gb": 80}}')
    s = load_settings(_env_file=None)
    assert s.autoscale.enabled and s.autoscale.latency_target_s == 45
    assert s.autoscale.classes["a100-80gb"].memory_gb == 80
    monkeypatch.delenv("ATELIER_AUTOSCALE__CLASSES")
    with pytest.raises(ConfigError, match="ATELIER_AUTOSCALE: autoscale is enabled but no"):
        load_settings(_env_file=None)


def _spec(name: str, min_vram_gb: float) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": name, "family": "sd15", "path": "/nowhere", "min_vram_gb": min_vram_gb,
         "default_width": 512, "default_height": 512, "max_width": 1024, "max_height": 1024,
         "default_steps": 20, "max_steps": 50, "scheduler": "Euler", "guidance": 7}
    )


async def test_tick_asks_when_the_queue_changes_and_clears_when_it_drains(
    tmp_path: Any,
) -> None:
    asked: list[list[dict[str, float]]] = []
    scaler = Autoscaler(
        config(), worker_config=WorkerConfig(data_dir=tmp_path), prefix="w",
        request=asked.append, free_slots=dict,
    )
    pool = WorkerPool()
    assert scaler.impossible(_spec("huge", 100)) is not None
    assert scaler.impossible(_spec("big", 40)) is None  # no worker now, but the class exists
    await scaler.tick({"a100-80gb": 2}, pool)
    await scaler.tick({"a100-80gb": 2}, pool)  # unchanged: not asked again
    await scaler.tick({}, pool)
    assert asked == [[{"device:a100-80gb": 1.0, "CPU": 1.0, "GPU": 1.0}], []]


def _scaler(tmp_path: Any, asked: list[list[dict[str, float]]], **over: Any) -> Autoscaler:
    return Autoscaler(config(**over), worker_config=WorkerConfig(data_dir=tmp_path),
                      prefix="w", request=asked.append, free_slots=dict)


@pytest.fixture(params=["redis", "memory"])
async def broker(request: pytest.FixtureRequest) -> Any:
    b: Broker
    if request.param == "redis":
        b = RedisBroker(request.getfixturevalue("redis_url"), claim_idle_ms=1000,
                        max_deliveries=3)
    else:
        b = MemoryBroker()
    yield b
    await b.close()


async def test_two_dispatchers_ask_for_the_union_of_their_queues(
    tmp_path: Any, broker: Broker,
) -> None:
    """Ray's autoscaler keeps the last request only: each dispatcher asks for what every
    dispatcher's queue needs, so neither erases the other's jobs."""
    asked_a: list[list[dict[str, float]]] = []
    asked_b: list[list[dict[str, float]]] = []
    a, b = _scaler(tmp_path, asked_a), _scaler(tmp_path, asked_b)
    a.bind(broker, "d-a")
    b.bind(broker, "d-b")
    pool = WorkerPool()
    await a.tick({"a100-80gb": 2}, pool)
    await b.tick({"rtx4090-24gb": 1}, pool)
    union = [{"device:a100-80gb": 1.0, "CPU": 1.0, "GPU": 1.0},
             {"device:rtx4090-24gb": 1.0, "CPU": 1.0, "GPU": 1.0}]
    assert asked_b[-1] == union  # the last writer's request holds both classes
    await a.tick({"a100-80gb": 2}, pool)  # a sees b's demand now and asks the same
    assert asked_a[-1] == union
    # b stops: its demand goes, what a still needs stays asked for.
    await b.close()
    assert asked_b[-1] == [{"device:a100-80gb": 1.0, "CPU": 1.0, "GPU": 1.0}]
    assert set(await broker.registry.demand()) == {"d-a"}
    # Jobs queued for a class on another dispatcher keep a's idle check from releasing it.
    await broker.registry.publish_demand("d-c", {"rtx4090-24gb": {"queued": 5}}, 30)
    await a.tick({}, pool)
    assert a.total["rtx4090-24gb"]["queued"] == 5


async def test_run_time_is_measured_per_model_and_class(tmp_path: Any) -> None:
    times = RunTimes(weight=0.5)
    assert times.estimate("sdxl", "a100-80gb", 4.0) == 4.0  # not measured: the setting
    times.observe("sdxl", "a100-80gb", 40.0)
    times.observe("sdxl", "a100-80gb", 20.0)
    assert times.estimate("sdxl", "a100-80gb", 4.0) == 30.0
    assert times.estimate("sdxl", "rtx4090-24gb", 6.0) == 6.0
    with pytest.raises(ValueError, match="-1"):
        times.observe("sdxl", "a100-80gb", -1)
    asked: list[list[dict[str, float]]] = []
    scaler = _scaler(tmp_path, asked)
    pool = WorkerPool()
    # 3 jobs x 4 s (the class's run_s) fit one A100 within 30 s...
    assert (await scaler.tick({"a100-80gb": 3}, pool, {"a100-80gb": {"sdxl": 3}}))[
        "a100-80gb"] == 1
    # ...but measured at 30 s a job they need three, capped at the class's max_workers (2).
    scaler.run_times = times
    assert (await scaler.tick({"a100-80gb": 3}, pool, {"a100-80gb": {"sdxl": 3}}))[
        "a100-80gb"] == 2
