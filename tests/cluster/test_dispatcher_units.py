"""Pure units of the dispatcher, without Ray or services: fair batching, placement, job events."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from cluster.batching import FairQueue, Waiting
from cluster.contract import WorkerInfo
from cluster.events import (
    EventKind,
    ImageRef,
    JobEvent,
    nsfw_allowed,
    with_nsfw,
)
from cluster.placement import WorkerPool
from cluster.registry import ModelSpec
from core.errors import InvalidRequest
from core.jobs import DeliveryTarget

KEY_A = ("tiny", "txt2img", 64, 64)
KEY_B = ("tiny", "img2img", 64, 64)


def waiting(job: str, account: int, key: tuple[object, ...] = KEY_A, pixels: int = 1) -> Waiting:
    return Waiting(job, account, key, pixels)


def ids(batch: list[Waiting[Any]]) -> list[str]:
    return [w.job_id for w in batch]


def take_next(q: FairQueue[Any], **caps: int) -> list[str]:
    return ids(q.take_batch(q.heads()[0], **({"max_pixels": 100, "max_items": 4} | caps)))


# Fair batching ---------------------------------------------------------------------------------


def test_one_account_with_many_jobs_does_not_starve_another() -> None:
    q: FairQueue[Any] = FairQueue()
    for n in range(30):
        q.add(waiting(f"a{n}", account=1))
    q.add(waiting("b0", account=2))
    first = take_next(q)
    assert first == ["a0", "b0", "a1", "a2"]  # round-robin: b's one job in the first batch
    assert take_next(q) == ["a3", "a4", "a5", "a6"]
    assert len(q) == 23


def test_turns_rotate_between_accounts() -> None:
    q: FairQueue[Any] = FairQueue()
    for account in (1, 2, 3):
        for n in range(3):
            q.add(waiting(f"{account}-{n}", account))
    assert take_next(q, max_items=2) == ["1-0", "2-0"]
    # Account 1 led the last batch, so account 2 leads the next one.
    assert take_next(q, max_items=2) == ["2-1", "3-0"]
    assert take_next(q, max_items=2) == ["3-1", "1-1"]


def test_batch_only_takes_jobs_sharing_the_head_key() -> None:
    q: FairQueue[Any] = FairQueue()
    q.add(waiting("a0", 1, KEY_A))
    q.add(waiting("b0", 2, KEY_B))
    q.add(waiting("b1", 2, KEY_A))
    assert take_next(q) == ["a0", "b1"]  # b0 cannot share the call; b1 can
    assert take_next(q) == ["b0"]
    assert len(q) == 0


def test_pixel_budget_caps_a_batch_but_the_head_always_runs() -> None:
    q: FairQueue[Any] = FairQueue()
    q.add(waiting("big", 1, pixels=500))
    q.add(waiting("small", 2, pixels=10))
    assert take_next(q, max_pixels=100) == ["big"]  # over budget alone: still runs
    q.add(waiting("s2", 3, pixels=60))
    q.add(waiting("s3", 4, pixels=60))
    assert take_next(q, max_pixels=100) == ["small", "s2"]
    assert take_next(q, max_pixels=100) == ["s3"]


def test_fifo_within_an_account_and_remove() -> None:
    q: FairQueue[Any] = FairQueue()
    for n in range(4):
        q.add(waiting(f"a{n}", 1))
    assert q.remove("a1") is not None
    assert q.remove("missing") is None
    assert "a1" not in q and "a2" in q
    assert take_next(q, max_items=10) == ["a0", "a2", "a3"]
    with pytest.raises(ValueError, match="already queued"):
        q.add(waiting("x", 1))
        q.add(waiting("x", 1))


def test_take_batch_refuses_a_head_that_is_not_a_head() -> None:
    q: FairQueue[Any] = FairQueue()
    first, second = waiting("a0", 1), waiting("a1", 1)
    q.add(first)
    q.add(second)
    with pytest.raises(ValueError, match="not at the head"):
        q.take_batch(second, max_pixels=10, max_items=2)
    with pytest.raises(ValueError, match="max_items"):
        q.take_batch(first, max_pixels=10, max_items=0)


# Placement -------------------------------------------------------------------------------------


def spec(name: str, min_vram_gb: float) -> ModelSpec:
    return ModelSpec(
        name=name, path="/models/x", family="sd15", min_vram_gb=min_vram_gb,
        default_width=512, default_height=512, max_width=1024, max_height=1024,
        default_steps=20, max_steps=50, scheduler="Euler", guidance=7.0,
    )


def info(worker_id: str, vram: int | None, loaded: list[str] | None = None,
         busy: bool = False) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, device_class="cpu" if vram is None else f"gpu-{vram}gb",
        profile={"vram_gb": vram}, loaded_models=loaded or [], max_batch_pixels=4 * 512 * 512,
        busy=busy, node_id="node-" + worker_id,
    )


def test_placement_prefers_loaded_model_then_fit_then_least_busy() -> None:
    pool = WorkerPool(
        [(object(), info("small", 8)), (object(), info("big", 24, loaded=["sdxl"])),
         (object(), info("cpu", None))],
        host_memory_gb=16,
    )
    sdxl, sd15, huge = spec("sdxl", 8), spec("sd15", 4), spec("huge", 20)
    assert pool.choose(sdxl).worker_id == "big"  # already loaded there
    chosen = pool.choose(huge)
    assert chosen is not None and chosen.worker_id == "big"  # the only one with the memory
    pool.started(chosen)
    assert pool.choose(huge) is None  # busy with our batch
    assert pool.impossible(huge) is None  # busy is not impossible
    # sd15 fits all; the smallest idle device is kept for it, leaving the big one free.
    assert pool.choose(sd15).worker_id == "small"
    pool.finished(chosen, "huge")
    assert "huge" in chosen.loaded


def test_a_cpu_worker_is_the_fallback_not_the_smaller_fit() -> None:
    """A 25-32 GB model with an idle 32 GB-host CPU worker and an idle 80 GB card: the card,
    though the CPU's host memory is the smaller fit (and even when the CPU has it loaded)."""
    pool = WorkerPool([(object(), info("a100", 80)), (object(), info("cpu", None, ["big"]))],
                      host_memory_gb=32)
    chosen = pool.choose(spec("big", 30))
    assert chosen is not None and chosen.worker_id == "a100"
    pool.started(chosen)
    fallback = pool.choose(spec("big", 30))  # the card is taken: the CPU may run it
    assert fallback is not None and fallback.worker_id == "cpu"


def test_placement_keeps_a_model_to_the_workers_that_can_load_it() -> None:
    has = dataclasses.replace(info("has", 24), loadable_models=["sd15"])
    lacks = dataclasses.replace(info("lacks", 8), loadable_models=[])
    pool = WorkerPool([(object(), has), (object(), lacks)], host_memory_gb=16)
    sd15 = spec("sd15", 4)
    first = pool.choose(sd15)
    assert first is not None and first.worker_id == "has"  # not the (smaller) one lacking it
    pool.started(first)
    assert pool.choose(sd15) is None  # waits for it rather than failing on the other node
    # A model no worker can load goes to one anyway: it fails there at once, not retried.
    other = pool.choose(spec("other", 4))
    assert other is not None and other.worker_id == "lacks"


def test_a_model_no_worker_can_ever_run_is_reported() -> None:
    pool = WorkerPool([(object(), info("gpu", 24)), (object(), info("cpu", None))],
                      host_memory_gb=32)
    reason = pool.impossible(spec("giant", 80))
    assert reason is not None and "giant" in reason and "80" in reason and "32" in reason
    assert WorkerPool().impossible(spec("giant", 80)) is None  # no workers yet: wait for them


def test_dead_workers_are_skipped_and_revived_by_refresh() -> None:
    class Handle:
        def __init__(self, answer: WorkerInfo | None) -> None:
            self.answer = answer
            self.info = self

        def remote(self) -> Any:
            async def reply() -> WorkerInfo:
                if self.answer is None:
                    raise RuntimeError("actor died")
                return self.answer

            return reply()

    good = info("w1", 24)
    handle = Handle(good)
    pool = WorkerPool([(handle, good)], info_timeout_s=1)
    pool.mark_dead("w1", "test")
    assert pool.choose(spec("sd15", 4)) is None
    asyncio.run(pool.refresh())
    assert pool.choose(spec("sd15", 4)) is not None
    handle.answer = None
    asyncio.run(pool.refresh())
    assert pool.live() == []


# Events ----------------------------------------------------------------------------------------


def test_job_events_round_trip_through_stream_fields() -> None:
    delivery = DeliveryTarget(frontend="telegram", chat_id="42", message_id="7", extra={"k": "v"})
    event = JobEvent(
        EventKind.done, "job-1",
        images=(ImageRef(3, 0, 1234, "watercolor", 64, 64, "ab/cd/" + "a" * 64 + ".png"),
                ImageRef(4, 1, 1235, None, 64, 64, "ab/cd/" + "b" * 64 + ".png")),
        delivery=delivery,
    )
    fields = event.to_fields()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    back = JobEvent.from_fields(fields)
    assert back == event and back.delivery == delivery and back.terminal
    progress = JobEvent(EventKind.progress, "job-1", step=3, total=8)
    assert JobEvent.from_fields(progress.to_fields()) == progress
    failed = JobEvent(EventKind.failed, "job-2", reason="model x is not available")
    assert JobEvent.from_fields(failed.to_fields()).reason == "model x is not available"
    assert JobEvent.from_fields({**failed.to_fields(), "future_field": "x"}) == failed


@pytest.mark.parametrize(
    "fields",
    [{}, {"kind": "exploded", "job_id": "j"}, {"kind": "progress", "job_id": "j", "step": "x"},
     {"kind": "done", "job_id": "j", "images": "{"}, {"kind": "done", "job_id": "j",
                                                       "images": '[{"index": 1}]'}],
)
def test_bad_event_fields_are_refused(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        JobEvent.from_fields(fields)


def test_nsfw_flag_rides_on_the_delivery_target() -> None:
    target = DeliveryTarget(frontend="discord", chat_id="1")
    assert not nsfw_allowed(target)
    marked = with_nsfw(target, True)
    assert nsfw_allowed(marked) and not nsfw_allowed(with_nsfw(marked, False))


def test_the_dispatcher_takes_its_knobs_from_the_dispatch_settings(tmp_path: Any) -> None:
    from cluster.broker_memory import MemoryBroker
    from cluster.dispatcher import Dispatcher, Pacing
    from cluster.registry import ModelRegistry
    from core.settings import Dispatch, load_settings
    from storage.blobs import BlobStore
    from storage.db import make_engine, session_factory

    settings = load_settings(data_dir=tmp_path, _env_file=None)
    engine = make_engine(f"sqlite:///{tmp_path / 'atelier.db'}")
    dispatch = Dispatch(
        gather_window_ms=80, gather_gap_ms=20, max_batch_items=3, job_timeout_s=7,
        max_attempts=2, worker_lease_s=4, redeliver_grace_s=5, redeliver_window_s=50,
    )
    try:
        d = Dispatcher(
            dispatch=dispatch, sessions=session_factory(engine), broker=MemoryBroker(),
            blobs=BlobStore(tmp_path / "blobs"), workers=WorkerPool(), name="d1",
            models=ModelRegistry.load(settings), pacing=Pacing(reconcile_interval_s=3.0),
        )
    finally:
        engine.dispose()
    assert (d.gather_window_s, d.gather_gap_s, d.max_batch_items) == (0.08, 0.02, 3)
    assert (d.runner.job_timeout_s, d.runner.worker_lease_s) == (7, 4)
    assert d.settle.max_attempts == 2
    assert (d.reconciler.redeliver_grace_s, d.reconciler.redeliver_window_s) == (5, 50)
    assert d.reconciler.pass_interval_s == 3.0
    with pytest.raises(ValueError, match="pacing.window must be >= 1, got 0"):
        Dispatcher(
            dispatch=dispatch, sessions=session_factory(engine), broker=MemoryBroker(),
            blobs=BlobStore(tmp_path / "blobs"), workers=WorkerPool(), name="d2",
            models=d.models, pacing=Pacing(window=0),
        )
