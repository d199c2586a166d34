"""The Ray worker actor (one per device, advertised as a ``device:{class}`` resource) and how to
spawn one; the call that runs a batch on it is the job side's, in ``cluster.contract``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
import ray.exceptions as rex

from cluster.availability import loadable_models
from cluster.contract import (
    HOST_CLASSES,
    BatchItem,
    GenerationCancelled,
    ImageResult,
    JobRejected,
    LeaseLapsed,
    NoWorkerForClass,
    WorkerFailed,
    WorkerInfo,
    WorkerLost,
    _summary,
    device_resource,
    offered_device_classes,
)
from cluster.registry import ModelRegistry
from core.errors import AtelierError, ConfigError, ModelUnavailable
from core.logs import set_job, setup_logging
from core.prompts import Blocklist
from core.settings import Settings, WorkerConfig
from engine.cache import ModelCache, default_budget_bytes, describe_cache
from engine.calibrate import calibration_path, load_calibration, use_inductor_cache
from engine.devices import DeviceInfo, DeviceProfile, best_device, choose_profile, detect_devices
from engine.engine import Engine, ProgressFn

log = logging.getLogger(__name__)

# generate runs in a thread; the other slots serve cancel/info/health/preload meanwhile.
MAX_CONCURRENCY = 4

# glibc malloc settings, set in a worker's process before it starts (Ray's runtime_env: glibc
# reads them only then). By default every large activation a pipeline call frees goes back to
# the kernel (mmap'd blocks, a trimmed heap) and is faulted in again, page by page, on the next
# step: SD1.5-shaped 256² on a CPU took ~2.4 million page faults a call. One arena (the engine
# runs on executor threads, which would each get one), blocks up to 32 MB from the heap, a heap
# that is never trimmed and transparent huge pages for it: ~1,000 faults a call and 1.15-1.3x
# faster (bench/pipeline.py, "raw, worker's malloc" vs "raw, plain process"). The cost is that
# a worker keeps its peak memory, which a process that owns a device may.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's upper limit on 64-bit
    "MALLOC_TRIM_THRESHOLD_": str(2**40),
    "MALLOC_TOP_PAD_": str(64 * 2**20),
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


# How long what this node can load (files, Hugging Face cache) is taken as known.
LOADABLE_TTL_S = 5.0

# The actor ------------------------------------------------------------------------------------


@ray.remote
class WorkerActor:
    """Owns one device: a lazily built model cache and engine, one batch at a time.

    ``generate`` streams progress dicts and ends with one results, cancelled or error dict.
    """

    def __init__(
        self, config: WorkerConfig, device_class: str | None = None,
        profile: DeviceProfile | None = None,
    ) -> None:
        if not isinstance(config, WorkerConfig):  # a whole Settings would carry its secrets
            raise ConfigError(f"a worker takes a WorkerConfig, got {type(config).__name__}")
        # The dispatcher's log format here too: JSON lines naming the batch's jobs.
        setup_logging(config.log_format, config.log_level)
        self._config = config
        self._info: DeviceInfo | None = None
        if profile is None:
            # Ray's num_gpus=1 leaves exactly this worker's GPU visible, so the first is ours.
            self._info = best_device(detect_devices())
            profile = choose_profile(self._info)
        if device_class is not None and profile.device_class != device_class:
            raise ConfigError(
                f"this node offers {device_resource(device_class)} but its device is "
                f"{profile.device_name!r} (class {profile.device_class!r}); fix the node's "
                "Ray resources"
            )
        self._profile = profile
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._jobs_lock = threading.Lock()
        self._running: dict[str, int] = {}  # job id -> batches here holding it
        self._cancelled: set[str] = set()
        self._leases: dict[str, float] = {}  # batch id -> monotonic time its lease ends
        self._expired: set[str] = set()  # batches whose lease lapsed, until they end
        self._orphans_stopped = 0  # batches stopped because their caller stopped renewing
        self._registry: ModelRegistry | None = None
        self._loadable_now: list[str] | None = None
        self._loadable_at: float | None = None  # monotonic time of the last look
        ctx = ray.get_runtime_context()
        self._worker_id = ctx.get_actor_name() or ctx.get_actor_id() or f"pid-{os.getpid()}"
        self._node_id = ctx.get_node_id()

    # Queries ----------------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        engine, profile = self._engine, self._profile
        return WorkerInfo(
            worker_id=self._worker_id, device_class=profile.device_class,
            profile=dataclasses.asdict(profile),
            loaded_models=engine.cache.loaded() if engine is not None else [],
            max_batch_pixels=profile.max_batch_pixels, busy=bool(self._running),
            node_id=self._node_id, loadable_models=await asyncio.to_thread(self._loadable),
        )

    async def health(self) -> dict[str, Any]:
        engine = self._engine
        return {
            "ok": True, "worker_id": self._worker_id, "pid": os.getpid(),
            "config": self._config.model_dump(mode="json"),
            "env": {k: os.environ.get(k) for k in WORKER_ENV},
            "device_class": self._profile.device_class, "busy": bool(self._running),
            "jobs": sorted(self._running), "orphans_stopped": self._orphans_stopped,
            "cache": describe_cache(engine.cache) if engine is not None else None,
        }

    # Commands ---------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """Stop ``job_id`` at the next step; False when no batch here holds it."""
        with self._jobs_lock:
            if job_id not in self._running:
                return False
            self._cancelled.add(job_id)
            return True

    async def renew(self, batch_id: str, lease_s: float) -> bool:
        """Extend a running batch's lease by ``lease_s``; False when no such batch runs here."""
        with self._jobs_lock:
            if batch_id not in self._leases:
                return False
            self._leases[batch_id] = time.monotonic() + lease_s
            return True

    async def preload(self, model: str) -> None:
        try:
            await asyncio.to_thread(lambda: self._engine_now().cache.get(model))
        except AtelierError as exc:
            # Re-raised as a type that survives pickling with its message and code.
            raise WorkerFailed(exc.message, exc.code) from None

    async def generate(
        self, items: list[BatchItem], batch_id: str | None = None, lease_s: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Run one batch. With ``lease_s``, the caller must ``renew(batch_id, ...)`` before
        each lease ends, or the batch stops at its next step (an orphan of a dead caller)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        job_ids = [item.job_id for item in items]
        set_job(job_ids)  # this call's task (and the thread below) log with its job ids
        batch_id = batch_id or uuid.uuid4().hex
        self._track(job_ids, batch_id, lease_s)

        def progress(step: int, total: int) -> None:  # called from the engine's thread
            event = {"type": "progress", "step": step, "total": total}
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = asyncio.ensure_future(
            asyncio.to_thread(self._generate, items, progress, batch_id)
        )
        # Ends the event loop below after the last progress event (both go through the loop).
        work.add_done_callback(lambda _: events.put_nowait(None))
        work.add_done_callback(lambda fut: self._untrack(job_ids, batch_id, fut))
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            if not work.done():
                # The caller went away (ray.cancel, closed stream): stop at the next step.
                with self._jobs_lock:
                    self._cancelled.update(job_ids)
        final = _final_event(work)
        # The model loads this batch caused, for the dispatcher's metrics.
        engine = self._engine
        final["loads"] = engine.cache.take_load_times() if engine is not None else []
        yield final

    # Internals --------------------------------------------------------------------------

    def _loadable(self) -> list[str] | None:
        """The models this node can load now (a few stat calls per model), looked at again
        every LOADABLE_TTL_S: info() is asked every few seconds and must answer fast."""
        now = time.monotonic()
        if self._loadable_at is not None and now - self._loadable_at < LOADABLE_TTL_S:
            return self._loadable_now
        engine = self._engine
        try:
            if self._registry is None:
                self._registry = (engine.cache.registry if engine is not None
                                  else ModelRegistry.load(self._config))
            self._loadable_now = loadable_models(self._registry)
        except AtelierError as exc:
            log.warning("cannot tell which models load here: %s", exc)
            self._loadable_now = None
        self._loadable_at = now
        return self._loadable_now

    def _engine_now(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                config, info = self._config, self._info
                budget = default_budget_bytes(info) if info is not None else 8 * 2**30
                registry = ModelRegistry.load(config)
                calibration = load_calibration(calibration_path(config.data_dir))
                use_inductor_cache(config.data_dir)  # a compiled UNet's kernels survive restarts
                cache = ModelCache(registry, self._profile, budget, device_info=info,
                                   calibration=calibration)
                path = config.blocklist_file
                blocklist = Blocklist.load(path) if path is not None else None
                self._engine = Engine(cache, profile=self._profile, blocklist=blocklist)
            return self._engine

    def _generate(
        self, items: list[BatchItem], progress: ProgressFn, batch_id: str
    ) -> list[ImageResult]:
        engine = self._engine_now()
        everyone = frozenset(item.job_id for item in items)

        def cancelled() -> frozenset[str]:  # asked by the engine at every step
            with self._jobs_lock:
                if batch_id in self._expired:
                    return everyone
                ends = self._leases.get(batch_id)
                if ends is not None and time.monotonic() > ends:
                    del self._leases[batch_id]
                    self._expired.add(batch_id)
                    self._orphans_stopped += 1
                    log.warning("batch %s: its caller stopped renewing its lease; stopping "
                                "jobs %s", batch_id, sorted(everyone))
                    return everyone
                return frozenset(self._cancelled)

        try:
            return engine.generate(items, on_progress=progress, cancelled=cancelled)
        except GenerationCancelled:
            with self._jobs_lock:
                orphaned = batch_id in self._expired
            if orphaned:
                raise LeaseLapsed(
                    f"stopped: the batch's lease lapsed (caller silent); jobs {sorted(everyone)}"
                ) from None
            raise

    def _track(self, job_ids: list[str], batch_id: str, lease_s: float | None) -> None:
        with self._jobs_lock:
            for job_id in job_ids:
                self._running[job_id] = self._running.get(job_id, 0) + 1
            if lease_s is not None:
                self._leases[batch_id] = time.monotonic() + lease_s

    def _untrack(self, job_ids: list[str], batch_id: str, fut: asyncio.Future[Any]) -> None:
        with self._jobs_lock:
            self._leases.pop(batch_id, None)
            self._expired.discard(batch_id)
            for job_id in job_ids:
                left = self._running.pop(job_id, 1) - 1
                if left > 0:
                    self._running[job_id] = left
                else:
                    self._cancelled.discard(job_id)
        if not fut.cancelled():
            fut.exception()  # retrieved, so an abandoned batch's error is not logged as unhandled


def _final_event(work: asyncio.Future[list[ImageResult]]) -> dict[str, Any]:
    """The last event of a stream: the images, or why there are none."""
    try:
        return {"type": "results", "images": work.result()}
    except GenerationCancelled as exc:
        return {"type": "cancelled", "message": exc.message}
    except LeaseLapsed as exc:
        return {"type": "lease_lapsed", "message": exc.message}
    except JobRejected as exc:
        return {"type": "error", "code": exc.code, "message": exc.message, "job_id": exc.job_id}
    except ModelUnavailable as exc:  # the person's line travels; the paths stay in this log
        log.error("%s", exc.detail)
        return {"type": "error", "code": exc.code, "message": exc.message, "job_id": None}
    except AtelierError as exc:
        return {"type": "error", "code": exc.code, "message": exc.message, "job_id": None}
    except Exception as exc:
        log.exception("generation failed on worker")
        message = "image generation failed on the worker because of an internal error"
        # The operator's detail travels too: the worker's own log may go with its pod.
        detail = "".join(traceback.format_exception(exc))[-4000:]
        return {"type": "error", "code": "internal", "message": message, "job_id": None,
                "detail": detail}


def spawn_worker(
    *, settings: Settings | WorkerConfig, device_class: str | None = None,
    name: str | None = None, timeout_s: float = 60, profile: DeviceProfile | None = None,
    **actor_options: Any,
) -> Any:
    """Start a worker actor for ``device_class`` and wait (at most ``timeout_s``) until it answers.

    ``device_class`` None: the profile's class if given, else the first accelerator class
    offered, else "cpu". ``profile`` overrides device detection in the actor (tests, tools).
    ``actor_options`` override the Ray options chosen here (num_gpus, num_cpus...). The
    actor receives ``settings.worker_config()`` only: no bot token, no signing key.
    """
    config = settings.worker_config() if isinstance(settings, Settings) else settings
    offered = offered_device_classes()
    cls = device_class or (profile.device_class if profile is not None else None)
    if cls is None:
        accelerators = [c for c in offered if c not in HOST_CLASSES]
        cls = accelerators[0] if accelerators else "cpu"
    if cls not in offered:
        raise NoWorkerForClass(
            f"no worker offers device class {cls!r}; available: {', '.join(offered) or 'none'}"
        )
    options: dict[str, Any] = {
        "resources": {device_resource(cls): 1},
        "num_cpus": 1,
        "num_gpus": 0 if cls in HOST_CLASSES else 1,
        "max_concurrency": MAX_CONCURRENCY,
        "max_restarts": 0,  # a dead worker is reported (WorkerLost), and the batch moves on
    }
    if name is not None:
        options["name"] = name
    runtime_env = dict(actor_options.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**WORKER_ENV, **runtime_env.get("env_vars", {})}
    options["runtime_env"] = runtime_env
    options |= actor_options
    # @ray.remote turns the class into an ActorClass, which mypy cannot see through.
    actor: Any = WorkerActor
    handle = actor.options(**options).remote(config, device_class=cls, profile=profile)
    try:
        ray.get(handle.info.remote(), timeout=timeout_s)
    except rex.GetTimeoutError:
        ray.kill(handle)  # else Ray keeps it pending, holding the resources it asked for
        raise WorkerLost(
            f"the worker for device class {cls!r} did not start within {timeout_s:g}s "
            f"(all {cls!r} slots busy, or the node is overloaded)",
            reason="timeout",
        ) from None
    except rex.RayActorError as exc:
        raise WorkerFailed(
            f"the worker for device class {cls!r} failed to start: {_summary(exc)}",
            "worker_start_failed",
        ) from None
    return handle


