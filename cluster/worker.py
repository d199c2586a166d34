"""The Ray worker actor (one per device, advertised as a ``device:{class}`` resource) and the
caller-side helpers that spawn it and run a batch on it with every wait bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions as rex
from ray._private import ray_constants

from cluster.availability import loadable_models
from cluster.cache import ModelCache, default_budget_bytes, describe_cache
from cluster.calibrate import calibration_path, load_calibration
from cluster.devices import DeviceInfo, DeviceProfile, best_device, choose_profile, detect_devices
from cluster.engine import (
    BatchItem,
    Engine,
    GenerationCancelled,
    ImageResult,
    JobRejected,
    ProgressFn,
)
from cluster.registry import ModelRegistry
from core.errors import AtelierError, ConfigError, ModelUnavailable
from core.logs import set_job, setup_logging
from core.prompts import Blocklist
from core.settings import Settings, WorkerConfig

log = logging.getLogger(__name__)

DEVICE_RESOURCE_PREFIX = "device:"
# generate runs in a thread; the other slots serve cancel/info/health/preload meanwhile.
MAX_CONCURRENCY = 4
# Device classes that take no GPU slot from Ray.
HOST_CLASSES = frozenset({"cpu", "mps"})

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

ProgressCallback = Callable[[int, int], object]
# A batch's caller renews its lease every LEASE_RENEW_FRACTION of it; a batch whose lease
# lapses (its dispatcher died: Ray lets an actor call run on after its caller is gone) is
# stopped at its next step, so a reclaimed job does not run twice on one device.
DEFAULT_LEASE_S = 10.0
LEASE_RENEW_FRACTION = 0.25
# How long what this node can load (files, Hugging Face cache) is taken as known.
LOADABLE_TTL_S = 5.0

# The actor, its process or its node is gone or unreachable: try another worker.
_LOST_ERRORS: tuple[type[BaseException], ...] = (
    rex.RayActorError,  # ActorDiedError, ActorUnavailableError
    rex.WorkerCrashedError,
    rex.NodeDiedError,
    rex.LocalRayletDiedError,
    rex.ObjectLostError,  # OwnerDiedError, ObjectFetchTimedOutError...
    rex.OutOfMemoryError,
    rex.ActorUnschedulableError,
)


def device_resource(device_class: str) -> str:
    """The Ray custom resource a node offers per worker slot of ``device_class``."""
    return f"{DEVICE_RESOURCE_PREFIX}{device_class}"


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    device_class: str
    profile: dict[str, object]
    loaded_models: list[str]
    max_batch_pixels: int
    busy: bool
    node_id: str
    # The models this worker's node can load (files, Hugging Face cache, or the hub when
    # online); None when it could not tell (its registry failed to load).
    loadable_models: list[str] | None = None


class WorkerLost(AtelierError):
    """The actor or its node died or became unreachable mid-call: retry the batch elsewhere.

    ``reason`` is "died", "unavailable", "node", "timeout", or "lease" (the worker is fine: it
    stopped the batch because the caller's lease renewals stopped reaching it).
    """

    code = "worker_lost"

    def __init__(self, message: str, reason: str = "died") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.reason))


class WorkerFailed(AtelierError):
    """The job itself failed on the worker (bad input, model load error...).

    ``message`` is fit to show the job's owner; ``error_code`` is the worker-side error's code;
    ``job_id`` names the one job at fault when the others of the batch could still run.
    """

    code = "worker_failed"

    def __init__(self, message: str, error_code: str = code, job_id: str | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.error_code, self.job_id))


class LeaseLapsed(AtelierError):
    """The worker stopped a batch whose caller stopped renewing its lease."""

    code = "lease_lapsed"


class NoWorkerForClass(AtelierError):
    """No node offers the requested device class (Ray would leave the actor pending forever)."""

    code = "no_worker_for_class"


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


# Caller side ----------------------------------------------------------------------------------


def offered_device_classes() -> list[str]:
    """Device classes some node of the connected Ray cluster offers."""
    return sorted(
        key.removeprefix(DEVICE_RESOURCE_PREFIX)
        for key, amount in ray.cluster_resources().items()
        if key.startswith(DEVICE_RESOURCE_PREFIX) and amount > 0
    )


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


async def run_batch(
    handle: Any, items: list[BatchItem], *, on_progress: ProgressCallback | None = None,
    timeout_s: float, lease_s: float | None = DEFAULT_LEASE_S,
    on_load: Callable[[str, float], object] | None = None,
) -> list[ImageResult]:
    """Run ``items`` on the worker ``handle``, relaying progress; the images in job order.

    ``timeout_s`` bounds every wait: the first event (which includes loading the model) and
    each one after. ``lease_s``: renewed from here while this call waits; should this process
    die, the worker stops the batch within about that long (None: it runs to its end).
    ``on_load(model, seconds)`` hears of each model the worker loaded for this batch.
    Raises WorkerLost (retry elsewhere), WorkerFailed (the job is at fault), or
    GenerationCancelled (every job was cancelled).
    """
    batch_id = uuid.uuid4().hex
    stream = handle.generate.remote(items, batch_id, lease_s)
    keeper = (
        asyncio.create_task(_renew_lease(handle, batch_id, lease_s))
        if lease_s is not None else None
    )
    try:
        while True:
            try:
                ref = await asyncio.wait_for(stream.__anext__(), timeout_s)
            except StopAsyncIteration:
                raise WorkerLost("the worker's stream ended without results") from None
            event = await asyncio.wait_for(ref, timeout_s)
            kind = event.get("type")
            if on_load is not None:
                for model, seconds in event.get("loads", ()):
                    on_load(str(model), float(seconds))
            if kind == "progress":
                if on_progress is not None:
                    maybe = on_progress(int(event["step"]), int(event["total"]))
                    if isinstance(maybe, Awaitable):
                        await maybe
            elif kind == "results":
                return list(event["images"])
            elif kind == "cancelled":
                raise GenerationCancelled(str(event["message"]))
            elif kind == "lease_lapsed":  # our renewals did not get through in time
                raise WorkerLost(str(event["message"]), reason="lease")
            elif kind == "error":
                if event.get("detail"):  # into the caller's log, with its jobs' ids
                    log.error("the worker failed the batch: %s", event["detail"])
                raise WorkerFailed(str(event["message"]), str(event["code"]), event.get("job_id"))
            else:
                raise WorkerFailed(f"the worker sent an unknown event type {kind!r}", "protocol")
    except TimeoutError:
        _cancel_quietly(stream)
        message = f"timed out after {timeout_s:g}s waiting for the worker"
        raise WorkerLost(message, reason="timeout") from None
    except asyncio.CancelledError:
        _cancel_quietly(stream)  # the worker then stops the batch at its next step
        raise
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, WorkerFailed):
            raise WorkerFailed(cause.message, cause.error_code, cause.job_id) from None
        if isinstance(cause, AtelierError):
            raise WorkerFailed(cause.message, cause.code) from None
        raise WorkerFailed(f"the worker failed: {_summary(exc)}", "internal") from None
    except _LOST_ERRORS as exc:
        raise _lost(exc) from None
    finally:
        if keeper is not None:
            keeper.cancel()


async def _renew_lease(handle: Any, batch_id: str, lease_s: float) -> None:
    """Renew a batch's lease until cancelled. A lost renewal is only logged: a dead worker
    shows on the batch's own stream, and a worker that is merely slow to answer gets the
    next one (each is sent well before the lease ends)."""
    every = lease_s * LEASE_RENEW_FRACTION
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.wait_for(handle.renew.remote(batch_id, lease_s), every)
        except Exception as exc:  # CancelledError is not an Exception: cancelling still stops
            log.debug("batch %s: lease renewal failed: %s", batch_id, exc)


def _lost(exc: BaseException) -> WorkerLost:
    if isinstance(exc, rex.ActorUnavailableError):
        reason = "unavailable"
    elif isinstance(exc, rex.NodeDiedError | rex.LocalRayletDiedError):
        reason = "node"
    else:
        reason = "died"
    return WorkerLost(f"the worker was lost ({reason}): {_summary(exc)}", reason=reason)


def _summary(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cancel_quietly(stream: Any) -> None:
    try:
        ray.cancel(stream)
    except Exception as exc:  # best effort: the worker may already be gone
        log.debug("could not cancel a worker stream: %s", exc)


# Local Ray ------------------------------------------------------------------------------------


def init_local_ray(
    *, num_cpus: int | None = None, resources: dict[str, float] | None = None, **kw: Any
) -> None:
    """Start (or keep) a Ray instance on this machine, pinned to loopback, without dashboard."""
    if ray.is_initialized():
        return
    # A self-hosted box reports nothing home; Ray reads only this variable for it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On Linux Ray swaps 127.0.0.1 for the routable address (services.resolve_ip_for_localhost)
    # unless multi-node clusters are off: this flag, named for Windows/macOS, keeps loopback, in
    # this process (already imported) and, inherited, in the raylet and workers it starts.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # A new local instance, never whichever Ray another program left in /tmp/ray: joining
    # that one would fail ("num_cpus must not be provided") or, worse, run our jobs on it.
    kw.setdefault("address", "local")
    ray.init(
        _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
        resources=resources, **kw,
    )
