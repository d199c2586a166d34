"""Workers from demand: how many workers of each device class the queue needs (queued jobs x
expected run time against a latency target), asked of Ray's autoscaler as resource bundles
(``ray.autoscaler.sdk.request_resources``; cleared when the queue drains), a worker actor
started on each node that appears with a free device slot, and the workers this dispatcher
started stopped once idle, so their nodes go idle and the autoscaler removes them.

Which class a job needs: the configured class with the least memory that still fits its model
(``min_vram_gb``), so small models do not wake the big cards."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from cluster.placement import WorkerPool
from cluster.registry import ModelSpec
from cluster.worker import HOST_CLASSES, device_resource
from core import metrics
from core.settings import Autoscale, WorkerConfig

log = logging.getLogger(__name__)

Bundle = dict[str, float]
UNPLACED = "unplaced"  # the metrics' class for a job no known class fits


def class_for(min_vram_gb: float, memory_gb: Mapping[str, float]) -> str | None:
    """The class with the least memory of at least ``min_vram_gb`` (ties: by name)."""
    fitting = [(mem, name) for name, mem in memory_gb.items() if mem >= min_vram_gb]
    return min(fitting)[1] if fitting else None


def workers_needed(queued: int, busy: int, *, run_s: float, target_s: float,
                   max_workers: int) -> int:
    """Workers one class needs: those busy now, plus enough for the queued jobs to start
    within ``target_s`` when each takes ``run_s`` (at least one while any job waits, at most
    one per queued job: a job runs on one worker); never more than ``max_workers``; none when
    nothing is queued or running."""
    if queued < 0 or busy < 0:
        raise ValueError(f"queued and busy must be >= 0, got {queued} and {busy}")
    if queued == 0:
        return min(busy, max_workers)
    for_queue = min(queued, max(1, math.ceil(queued * run_s / target_s)))
    return min(busy + for_queue, max_workers)


def plan(queued: Mapping[str, int], busy: Mapping[str, int], config: Autoscale) -> dict[str, int]:
    """Workers wanted per configured class."""
    return {
        name: workers_needed(
            queued.get(name, 0), busy.get(name, 0), run_s=cls.run_s,
            target_s=config.latency_target_s, max_workers=cls.max_workers,
        )
        for name, cls in sorted(config.classes.items())
    }


def bundles(wanted: Mapping[str, int], config: Autoscale) -> list[Bundle]:
    """One Ray resource bundle per wanted worker: its device slot, CPUs and GPU."""
    out: list[Bundle] = []
    for name, n in sorted(wanted.items()):
        cls = config.classes[name]
        bundle: Bundle = {device_resource(name): 1.0}
        if cls.cpus > 0:
            bundle["CPU"] = cls.cpus
        if cls.gpus > 0 and name not in HOST_CLASSES:
            bundle["GPU"] = cls.gpus
        out += [dict(bundle) for _ in range(n)]
    return out


def _request_resources(wanted: list[Bundle]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=wanted)


def _free_slots() -> dict[str, float]:
    import ray

    return {k: v for k, v in ray.available_resources().items() if k.startswith("device:")}


class Autoscaler:
    """One dispatcher's side of autoscaling; ``tick`` runs every ``config.interval_s``."""

    def __init__(
        self, config: Autoscale, *, worker_config: WorkerConfig, prefix: str,
        request: Callable[[list[Bundle]], None] = _request_resources,
        free_slots: Callable[[], Mapping[str, float]] = _free_slots,
        profile_for: Callable[[str], Any] | None = None,
        spawn_timeout_s: float = 120.0,
    ) -> None:
        """``profile_for(device_class)``: a DeviceProfile for workers started here (tests
        describe fake devices); None lets each worker detect its own device."""
        self.config = config
        self.worker_config = worker_config
        self.prefix = prefix
        self._request = request
        self._free_slots = free_slots
        self._profile_for = profile_for
        self.spawn_timeout_s = spawn_timeout_s
        self.memory_gb = {name: c.memory_gb for name, c in config.classes.items()}
        self.wanted: dict[str, int] | None = None  # as last requested
        self.started: dict[str, Any] = {}  # worker id -> handle, workers this dispatcher started
        self._idle_since: dict[str, float] = {}
        # Starting workers waits for Ray (seconds, or minutes for a new node's actor): in a
        # task of its own, so the dispatcher keeps placing jobs on the workers it has.
        self._starting: asyncio.Task[None] | None = None

    def class_of(self, spec: ModelSpec) -> str | None:
        return class_for(spec.min_vram_gb, self.memory_gb)

    def impossible(self, spec: ModelSpec) -> str | None:
        """Why no configured class could ever run ``spec`` (None: one could, once scaled)."""
        if self.class_of(spec) is not None:
            return None
        biggest = max(self.memory_gb.values(), default=0.0)
        return (f"model {spec.name} needs a device with at least {spec.min_vram_gb:g} GB of "
                f"memory; the largest device class here has {biggest:g} GB")

    async def tick(self, queued: Mapping[str, int], pool: WorkerPool) -> dict[str, int]:
        """Ask for what the queue needs, start workers on new slots, stop idle ones."""
        busy: dict[str, int] = {}
        for slot in pool.live():
            if slot.batches > 0:
                busy[slot.info.device_class] = busy.get(slot.info.device_class, 0) + 1
        wanted = plan(queued, busy, self.config)
        if wanted != self.wanted:
            log.info("autoscale: asking for workers %s (queued %s)", wanted, dict(queued))
            await asyncio.to_thread(self._request, bundles(wanted, self.config))
            self.wanted = wanted
            for name, n in wanted.items():
                metrics.AUTOSCALE_WANTED.labels(name).set(n)
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start_workers_logged(wanted, pool))
        await self._stop_idle(queued, pool)
        return wanted

    async def _start_workers_logged(self, wanted: Mapping[str, int], pool: WorkerPool) -> None:
        try:
            await self._start_workers(wanted, pool)
        except Exception:  # Ray unreachable, say: the next tick tries again
            log.exception("autoscale: starting workers failed")

    async def _start_workers(self, wanted: Mapping[str, int], pool: WorkerPool) -> None:
        have: dict[str, int] = {}
        for slot in pool.live():
            have[slot.info.device_class] = have.get(slot.info.device_class, 0) + 1
        free = await asyncio.to_thread(self._free_slots)
        for name, n in sorted(wanted.items()):
            missing = min(n - have.get(name, 0), int(free.get(device_resource(name), 0)))
            for _ in range(max(0, missing)):
                handle = await asyncio.to_thread(self._spawn, name)
                if handle is None:
                    break
                joined = await pool.join(handle)
                if joined is not None:
                    self.started[joined.worker_id] = handle
                    self._idle_since[joined.worker_id] = time.monotonic()

    def _spawn(self, device_class: str) -> Any:
        from cluster.worker import spawn_worker

        profile = self._profile_for(device_class) if self._profile_for is not None else None
        name = f"{self.prefix}-{device_class}-{uuid.uuid4().hex[:8]}"
        try:
            return spawn_worker(
                settings=self.worker_config, device_class=device_class, profile=profile,
                name=name, timeout_s=self.spawn_timeout_s,
            )
        except Exception as exc:  # another dispatcher took the slot first, or the node went
            log.warning("autoscale: could not start a %s worker: %s", device_class, exc)
            return None

    async def _stop_idle(self, queued: Mapping[str, int], pool: WorkerPool) -> None:
        import ray

        now = time.monotonic()
        for worker_id, handle in list(self.started.items()):
            slot = pool.get(worker_id)
            if slot is None or not slot.alive:
                self.started.pop(worker_id, None)
                self._idle_since.pop(worker_id, None)
                continue
            if slot.batches > 0 or queued.get(slot.info.device_class, 0) > 0:
                self._idle_since[worker_id] = now
                continue
            if now - self._idle_since.get(worker_id, now) < self.config.idle_release_s:
                continue
            log.info("autoscale: stopping idle worker %s (%s)", worker_id,
                     slot.info.device_class)
            pool.remove(worker_id)
            self.started.pop(worker_id, None)
            self._idle_since.pop(worker_id, None)
            await asyncio.to_thread(ray.kill, handle)

    async def close(self) -> None:
        """Withdraw the request and stop the workers started here."""
        import ray

        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.wait({self._starting}, timeout=5)
        if self.wanted is not None:
            await asyncio.to_thread(self._request, [])
        for handle in self.started.values():
            try:
                await asyncio.to_thread(ray.kill, handle)
            except Exception as exc:
                log.debug("autoscale: stopping a worker failed: %s", exc)
        self.started.clear()
