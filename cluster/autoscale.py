"""Workers from demand: how many workers of each device class the queue needs (queued jobs x
expected run time against a latency target), asked of Ray's autoscaler as resource bundles
(``ray.autoscaler.sdk.request_resources``; cleared when the queue drains), a worker actor
started on each node that appears with a free device slot, and the workers this dispatcher
started stopped once idle, so their nodes go idle and the autoscaler removes them.

One demand for the cluster: Ray's autoscaler keeps only the last ``request_resources`` call, so
each dispatcher publishes what it sees (queued jobs, busy workers, seconds of queued work per
class) to the broker with a TTL, and asks for what the sum of every dispatcher's record needs:
all dispatchers ask for the same thing, and none erases another's jobs. The seconds a job takes
are measured per model and class (a moving average of real batches), the class's ``run_s``
standing in until a batch of that model ran there.

Which class a job needs: the accelerator class with the least memory that still fits its model
(``min_vram_gb``), so small models do not wake the big cards; a host class (cpu, mps) only when
no accelerator class fits, as the fallback the operator chose by configuring it. An accelerator
class's memory is the size in its name (the device table: cluster/devices.py), and a configured
``memory_gb`` above it is refused."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from cluster import keys
from cluster.broker import Broker
from cluster.contract import HOST_CLASSES, device_resource
from cluster.device_classes import class_memory_gb
from cluster.placement import WorkerPool
from cluster.registry import ModelSpec
from core import metrics
from core.errors import ConfigError
from core.settings import Autoscale, WorkerConfig

log = logging.getLogger(__name__)

Bundle = dict[str, float]
UNPLACED = "unplaced"  # the metrics' class for a job no known class fits


def class_for(min_vram_gb: float, memory_gb: Mapping[str, float]) -> str | None:
    """The accelerator class with the least memory of at least ``min_vram_gb`` (ties: by
    name); a host class (cpu, mps: the fallback) only when no accelerator class fits."""
    fitting = [(name in HOST_CLASSES, mem, name) for name, mem in memory_gb.items()
               if mem >= min_vram_gb]
    return min(fitting)[2] if fitting else None


def class_memory(config: Autoscale) -> dict[str, float]:
    """Each class's memory for placement: the configured ``memory_gb``, checked against the
    card size the class's name carries (a class is never credited more than its card)."""
    out: dict[str, float] = {}
    for name, cls in config.classes.items():
        card = class_memory_gb(name)
        if card is not None and cls.memory_gb > card:
            raise ConfigError(
                f"ATELIER_AUTOSCALE__CLASSES: class {name!r} has memory_gb {cls.memory_gb:g}, "
                f"but its card has {card} GB (the size in its name); models needing more "
                "would be placed on it"
            )
        out[name] = cls.memory_gb
    return out


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


def plan(queued: Mapping[str, int], busy: Mapping[str, int], config: Autoscale,
         run_s: Mapping[str, float] | None = None) -> dict[str, int]:
    """Workers wanted per configured class (``run_s``: measured seconds per queued job of a
    class, else the class's configured ``run_s``)."""
    measured = run_s or {}
    return {
        name: workers_needed(
            queued.get(name, 0), busy.get(name, 0), run_s=measured.get(name, cls.run_s),
            target_s=config.latency_target_s, max_workers=cls.max_workers,
        )
        for name, cls in sorted(config.classes.items())
    }


class RunTimes:
    """Seconds a job of a model takes on a class: an exponential moving average of the
    batches that ran (a batch's time over its jobs), by (model, class)."""

    def __init__(self, weight: float = 0.3) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.seconds: dict[tuple[str, str], float] = {}

    def observe(self, model: str, device_class: str, seconds_per_job: float) -> None:
        if seconds_per_job < 0:
            raise ValueError(f"seconds_per_job must be >= 0, got {seconds_per_job}")
        key = (model, device_class)
        old = self.seconds.get(key)
        self.seconds[key] = seconds_per_job if old is None else (
            old + self.weight * (seconds_per_job - old))

    def estimate(self, model: str, device_class: str, default: float) -> float:
        return self.seconds.get((model, device_class), default)


Demand = dict[str, dict[str, float]]  # class -> {"queued", "busy", "work_s"}


def total_demand(records: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Demand:
    """Every dispatcher's demand added up per class."""
    out: Demand = {}
    for record in records.values():
        for cls, d in record.items():
            mine = out.setdefault(cls, {"queued": 0.0, "busy": 0.0, "work_s": 0.0})
            for k in mine:
                mine[k] += float(d.get(k, 0.0))
    return out


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
        spawn: Callable[..., Any] | None = None,
    ) -> None:
        """``profile_for(device_class)``: a DeviceProfile for workers started here (tests
        describe fake devices); None lets each worker detect its own device. ``spawn``: how a
        worker is started (``engine.actor.spawn_worker``, passed in by the composition root so
        that the job side never imports the engine); None: this autoscaler only asks Ray for
        nodes and starts no worker itself."""
        self.config = config
        self.worker_config = worker_config
        self.prefix = prefix
        self._request = request
        self._free_slots = free_slots
        self._profile_for = profile_for
        self.spawn_timeout_s = spawn_timeout_s
        self._spawn_worker = spawn
        self.memory_gb = class_memory(config)
        self.wanted: dict[str, int] | None = None  # as last requested
        self.started: dict[str, Any] = {}  # worker id -> handle, workers this dispatcher started
        self._idle_since: dict[str, float] = {}
        self.run_times = RunTimes()
        # Where the dispatchers' demand meets (bind()); None: this dispatcher's alone.
        self.broker: Broker | None = None
        self.name = prefix
        self.total: Demand = {}  # the cluster-wide demand as last planned
        # Starting workers waits for Ray (seconds, or minutes for a new node's actor): in a
        # task of its own, so the dispatcher keeps placing jobs on the workers it has.
        self._starting: asyncio.Task[None] | None = None

    def bind(self, broker: Broker, name: str) -> None:
        """Share demand through ``broker`` as dispatcher ``name``."""
        keys.check_consumer(name)
        self.broker = broker
        self.name = name

    @property
    def demand_ttl_s(self) -> float:
        return max(keys.DEMAND_TTL_S, 3 * self.config.interval_s)

    def local_demand(self, queued: Mapping[str, int], pool: WorkerPool,
                     models: Mapping[str, Mapping[str, int]] | None) -> Demand:
        """What this dispatcher sees per class: queued jobs, its busy workers, and the
        seconds of queued work (measured per model where a batch ran, else ``run_s``)."""
        busy: dict[str, int] = {}
        for slot in pool.live():
            if slot.batches > 0:
                busy[slot.info.device_class] = busy.get(slot.info.device_class, 0) + 1
        out: Demand = {}
        for name, cls in self.config.classes.items():
            n = queued.get(name, 0)
            if models is not None and name in models:
                work = sum(count * self.run_times.estimate(model, name, cls.run_s)
                           for model, count in models[name].items())
            else:
                work = n * cls.run_s
            out[name] = {"queued": float(n), "busy": float(busy.get(name, 0)),
                         "work_s": float(work)}
        return out

    def plan_total(self, total: Mapping[str, Mapping[str, float]]) -> dict[str, int]:
        queued = {c: int(d["queued"]) for c, d in total.items()}
        busy = {c: int(d["busy"]) for c, d in total.items()}
        run_s = {c: d["work_s"] / d["queued"] for c, d in total.items() if d["queued"] > 0}
        return plan(queued, busy, self.config, run_s)

    def class_of(self, spec: ModelSpec) -> str | None:
        return class_for(spec.min_vram_gb, self.memory_gb)

    def impossible(self, spec: ModelSpec) -> str | None:
        """Why no configured class could ever run ``spec`` (None: one could, once scaled)."""
        if self.class_of(spec) is not None:
            return None
        biggest = max(self.memory_gb.values(), default=0.0)
        return (f"model {spec.name} needs a device with at least {spec.min_vram_gb:g} GB of "
                f"memory; the largest device class here has {biggest:g} GB")

    async def tick(self, queued: Mapping[str, int], pool: WorkerPool,
                   models: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, int]:
        """Ask for what the cluster's queue needs (every dispatcher's, when bound to a
        broker), start workers on new slots, stop idle ones. ``models``: the queued jobs per
        class and model, for the measured run times."""
        local = self.local_demand(queued, pool, models)
        if self.broker is not None:
            await self.broker.registry.publish_demand(self.name, local, self.demand_ttl_s)
            records = await self.broker.registry.demand()
            records[self.name] = local  # ours as of now, whatever the read raced with
            self.total = total_demand(records)
        else:
            self.total = total_demand({self.name: local})
        wanted = self.plan_total(self.total)
        all_queued = {c: int(d["queued"]) for c, d in self.total.items()}
        if wanted != self.wanted:
            log.info("autoscale: asking for workers %s (queued %s, here %s)", wanted,
                     all_queued, dict(queued))
            await asyncio.to_thread(self._request, bundles(wanted, self.config))
            self.wanted = wanted
            for name, n in wanted.items():
                metrics.AUTOSCALE_WANTED.labels(name).set(n)
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._start_workers_logged(wanted, pool))
        await self._stop_idle(all_queued, pool)  # nothing queued for the class anywhere
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
        spawn_worker = self._spawn_worker
        if spawn_worker is None:
            log.warning("autoscale: no way to start a %s worker was given", device_class)
            return None
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
            if await self._busy_elsewhere(handle):  # another dispatcher's batch runs on it
                self._idle_since[worker_id] = now
                continue
            log.info("autoscale: stopping idle worker %s (%s)", worker_id,
                     slot.info.device_class)
            pool.remove(worker_id)
            self.started.pop(worker_id, None)
            self._idle_since.pop(worker_id, None)
            await asyncio.to_thread(ray.kill, handle)

    @staticmethod
    async def _busy_elsewhere(handle: Any) -> bool:
        """Whether the worker runs a batch now (slot.batches counts this dispatcher's only)."""
        try:
            info = await asyncio.wait_for(handle.info.remote(), 5)
        except Exception:  # gone or unreachable: nothing of anyone's runs there
            return False
        return bool(info.busy)

    async def close(self) -> None:
        """Withdraw the request and stop the workers started here."""
        import ray

        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.wait({self._starting}, timeout=5)
        if self.wanted is not None:
            # What the other dispatchers still need stays asked for.
            others: Mapping[str, Mapping[str, Mapping[str, float]]] = {}
            if self.broker is not None:
                try:
                    await self.broker.registry.withdraw_demand(self.name)
                    others = await self.broker.registry.demand()
                except Exception as exc:  # their next tick asks again
                    log.warning("autoscale: demand not withdrawn: %s", exc)
            rest = self.plan_total(total_demand(others))
            await asyncio.to_thread(self._request, bundles(rest, self.config))
        for handle in self.started.values():
            try:
                await asyncio.to_thread(ray.kill, handle)
            except Exception as exc:
                log.debug("autoscale: stopping a worker failed: %s", exc)
        self.started.clear()
