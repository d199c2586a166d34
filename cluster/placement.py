"""The workers a dispatcher can use and where a batch goes: a loaded model first, then a device
with the memory the model needs, then the least busy; dead workers are set aside."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.broker import Broker
from cluster.contract import HOST_CLASSES, WorkerInfo, WorkerLost
from cluster.registry import ModelSpec

log = logging.getLogger(__name__)

# A CPU (or Apple) worker runs models from host memory, which the worker does not report; it
# counts as this much "VRAM" when checking a model's min_vram_gb.
DEFAULT_HOST_MEMORY_GB = 32.0
DEFAULT_INFO_TIMEOUT_S = 5.0


@dataclass
class WorkerSlot:
    """One worker actor as this dispatcher sees it."""

    handle: Any
    info: WorkerInfo
    alive: bool = True
    batches: int = 0  # batches this dispatcher runs on it right now
    lost_reason: str | None = None
    loaded: list[str] = field(default_factory=list)  # models loaded, as last seen or used

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def memory_gb(self, host_memory_gb: float) -> float:
        vram = self.info.profile.get("vram_gb") if isinstance(self.info.profile, dict) else None
        return float(vram) if isinstance(vram, int | float) else host_memory_gb


class WorkerPool:
    """Worker actor handles with their last ``info()``. Not thread-safe: one event loop."""

    def __init__(
        self,
        workers: Iterable[tuple[Any, WorkerInfo]] = (),
        *,
        info_timeout_s: float = DEFAULT_INFO_TIMEOUT_S,
        host_memory_gb: float = DEFAULT_HOST_MEMORY_GB,
        batches_per_worker: int = 1,
        discover: Any = None,
    ) -> None:
        """``discover``: an optional async callable returning ``(handle, name)`` pairs of the
        workers that exist now (see ``ray_discovery``); ``refresh`` adds new ones."""
        if batches_per_worker < 1:
            raise ValueError(f"batches_per_worker must be at least 1, got {batches_per_worker}")
        self.info_timeout_s = info_timeout_s
        self.host_memory_gb = host_memory_gb
        self.batches_per_worker = batches_per_worker
        self._discover = discover
        self._slots: dict[str, WorkerSlot] = {}
        for handle, info in workers:
            self.add(handle, info)

    @classmethod
    async def from_handles(cls, handles: Iterable[Any], **kwargs: Any) -> WorkerPool:
        """A pool of the given actors, each asked for its ``info()`` (within the timeout)."""
        pool = cls(**kwargs)
        for handle in handles:
            info = await pool._fetch_info(handle)
            if info is not None:
                pool.add(handle, info)
        return pool

    # Membership --------------------------------------------------------------------------

    def add(self, handle: Any, info: WorkerInfo) -> WorkerSlot:
        slot = self._slots.get(info.worker_id)
        if slot is None:
            slot = WorkerSlot(handle, info, loaded=list(info.loaded_models))
            self._slots[info.worker_id] = slot
            log.info(
                "worker %s joined (class %s, node %s)",
                info.worker_id, info.device_class, info.node_id[:12],
            )
        else:
            slot.handle, slot.info, slot.alive, slot.lost_reason = handle, info, True, None
            slot.loaded = list(info.loaded_models)
        return slot

    async def join(self, handle: Any) -> WorkerSlot | None:
        """Add a just-started actor (asked for its ``info()``); None if it does not answer."""
        info = await self._fetch_info(handle)
        return self.add(handle, info) if info is not None else None

    def remove(self, worker_id: str) -> None:
        """Forget a worker (stopped on purpose, e.g. scaled down)."""
        self._slots.pop(worker_id, None)

    @property
    def slots(self) -> list[WorkerSlot]:
        return list(self._slots.values())

    def live(self) -> list[WorkerSlot]:
        return [s for s in self._slots.values() if s.alive]

    def get(self, worker_id: str) -> WorkerSlot | None:
        return self._slots.get(worker_id)

    def mark_dead(self, worker_id: str, reason: str) -> None:
        """Stop placing work on a worker (it raised WorkerLost); ``refresh`` may revive it."""
        slot = self._slots.get(worker_id)
        if slot is not None and slot.alive:
            slot.alive, slot.lost_reason = False, reason
            log.warning("worker %s marked dead: %s", worker_id, reason)

    async def _fetch_info(self, handle: Any) -> WorkerInfo | None:
        try:
            info = await asyncio.wait_for(_await_ref(handle.info.remote()), self.info_timeout_s)
        except TimeoutError:
            return None
        except Exception as exc:  # any Ray error: the actor is gone or unreachable
            log.debug("worker info failed: %s", exc)
            return None
        return info if isinstance(info, WorkerInfo) else None

    async def refresh(self) -> None:
        """Re-read every worker's ``info()`` (bounded by ``info_timeout_s``) and discover new
        ones. A worker that does not answer is marked dead; one that answers again is live."""
        if self._discover is not None:
            try:
                found = await self._discover()
            except Exception as exc:
                log.warning("worker discovery failed: %s", exc)
                found = []
            for handle, name in found:
                slot = self._slots.get(name)
                if slot is not None and slot.alive:
                    continue
                # New, or a dead worker's name taken by a new actor: use the fresh handle.
                info = await self._fetch_info(handle)
                if info is not None:
                    self.add(handle, info)
        slots = list(self._slots.values())
        infos = await asyncio.gather(*(self._fetch_info(s.handle) for s in slots))
        for slot, info in zip(slots, infos, strict=True):
            if info is None:
                self.mark_dead(slot.worker_id, "did not answer info()")
                continue
            if not slot.alive:
                log.info("worker %s answers again", slot.worker_id)
            slot.info, slot.alive, slot.lost_reason = info, True, None
            slot.loaded = list(info.loaded_models)

    # Placement ---------------------------------------------------------------------------

    def fits(self, slot: WorkerSlot, spec: ModelSpec) -> bool:
        return spec.min_vram_gb <= slot.memory_gb(self.host_memory_gb)

    def impossible(self, spec: ModelSpec) -> str | None:
        """Why no live worker could ever run ``spec``; None if one could (or none is live yet,
        when the job waits for workers rather than failing)."""
        live = self.live()
        if not live or any(self.fits(s, spec) for s in live):
            return None
        biggest = max(s.memory_gb(self.host_memory_gb) for s in live)
        return (
            f"model {spec.name} needs a device with at least {spec.min_vram_gb:g} GB of memory; "
            f"the largest worker here has {biggest:g} GB"
        )

    def idle(self) -> list[WorkerSlot]:
        return [s for s in self.live() if s.batches < self.batches_per_worker]

    @staticmethod
    def can_load(slot: WorkerSlot, spec: ModelSpec) -> bool:
        """Whether ``slot`` said its node can load ``spec`` (one that did not tell may)."""
        told = slot.info.loadable_models
        return told is None or spec.name in told

    def choose(self, spec: ModelSpec) -> WorkerSlot | None:
        """The best idle live worker for ``spec``: model loaded > fits > least busy. While a
        live worker that fits can load the model, only those: a node lacking the files must
        not fail a job another node could run. When none can, one tries, and the job fails
        at once (ModelUnavailable)."""
        candidates = [s for s in self.idle() if self.fits(s, spec)]
        if any(self.can_load(s, spec) for s in self.live() if self.fits(s, spec)):
            candidates = [s for s in candidates if self.can_load(s, spec)]
        if not candidates:
            return None

        def rank(slot: WorkerSlot) -> tuple[int, int, int, int, float, str]:
            return (
                # A host (CPU) worker only when no accelerator fits: its host memory is no
                # reason to send it a model a GPU could run.
                1 if slot.info.device_class in HOST_CLASSES else 0,
                0 if spec.name in slot.loaded else 1,
                1 if slot.info.busy else 0,  # busy with another dispatcher's batch
                slot.batches,
                # Among equals, keep the big devices free for the models that need them.
                slot.memory_gb(self.host_memory_gb),
                slot.worker_id,
            )

        return min(candidates, key=rank)

    def started(self, slot: WorkerSlot) -> None:
        slot.batches += 1

    def finished(self, slot: WorkerSlot, model: str | None = None) -> None:
        slot.batches = max(0, slot.batches - 1)
        if model is not None and model not in slot.loaded:
            slot.loaded.append(model)
            slot.info = replace(slot.info, loaded_models=list(slot.loaded))

    def lost(self, slot: WorkerSlot, exc: WorkerLost) -> None:
        self.mark_dead(slot.worker_id, f"{exc.reason}: {exc.message}")


def ray_discovery(prefix: str) -> Any:
    """A ``discover`` callable for WorkerPool: the named actors of the current Ray namespace
    whose names start with ``prefix`` (how ``atelier worker`` names its actors)."""
    import ray

    def find() -> list[tuple[Any, str]]:
        found = []
        for name in ray.util.list_named_actors():
            if isinstance(name, str) and name.startswith(prefix):
                try:
                    found.append((ray.get_actor(name), name))
                except ValueError:
                    continue  # died between listing and lookup
        return found

    async def discover() -> list[tuple[Any, str]]:
        return await asyncio.to_thread(find)

    return discover


async def _await_ref(ref: Any) -> Any:
    return await ref


async def publish_loadable(pool: WorkerPool, broker: Broker, ttl_s: float) -> int:
    """Publish through ``broker`` the models each live worker said it can load, for ``ttl_s``
    seconds (submit refuses a model no published worker can load). Returns how many workers
    were published; a dead worker is left to lapse."""
    published = 0
    for slot in pool.live():
        if slot.info.loadable_models is not None:
            await broker.registry.publish_worker_models(
                slot.worker_id, slot.info.loadable_models, ttl_s
            )
            published += 1
    return published
