"""The worker contract: what the job side and a worker actor say to each other (batch items,
image results, worker info and errors), the call that runs a batch on a worker with every wait
bounded, and the device-class Ray resources. No torch or Diffusers here: the actor itself lives
in ``engine.actor``."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions as rex
from ray._private import ray_constants

from core.errors import AtelierError, InvalidRequest
from core.request import GenerationRequest

log = logging.getLogger(__name__)

DEVICE_RESOURCE_PREFIX = "device:"
# Device classes that take no GPU slot from Ray.
HOST_CLASSES = frozenset({"cpu", "mps"})

ProgressCallback = Callable[[int, int], object]
# A batch's caller renews its lease every LEASE_RENEW_FRACTION of it; a batch whose lease
# lapses (its dispatcher died: Ray lets an actor call run on after its caller is gone) is
# stopped at its next step, so a reclaimed job does not run twice on one device.
DEFAULT_LEASE_S = 10.0
LEASE_RENEW_FRACTION = 0.25

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



@dataclass(frozen=True)
class BatchItem:
    """One job's request inside a batch."""

    job_id: str
    request: GenerationRequest  # seed already resolved (not None)
    nsfw_allowed: bool = False
    # The (prompt, negative) pairs admission prepared, one per style: used as they are (after
    # the real tokenizer's word on their length); None: prepared here.
    prompts: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class ImageResult:
    """One generated image. ``index`` is its position within its job, style-major."""

    job_id: str
    index: int
    seed: int
    style: str | None
    png: bytes
    width: int
    height: int
    prompt: str
    negative: str
    infotext: str
    model: str


class GenerationCancelled(AtelierError):
    """Every job of the batch was cancelled; the pipeline call was stopped."""

    code = "cancelled"


class JobRejected(AtelierError):
    """One job of a batch cannot run (blocked or too-long prompt, unreadable image); the other
    jobs can. ``code`` is the underlying error's, ``message`` fit to show its owner."""

    def __init__(self, job_id: str, message: str, code: str = InvalidRequest.code) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (Ray): rebuild with all three arguments, not just args.
        return (type(self), (self.job_id, self.message, self.code))


# Caller side ----------------------------------------------------------------------------------


def offered_device_classes() -> list[str]:
    """Device classes some node of the connected Ray cluster offers."""
    return sorted(
        key.removeprefix(DEVICE_RESOURCE_PREFIX)
        for key, amount in ray.cluster_resources().items()
        if key.startswith(DEVICE_RESOURCE_PREFIX) and amount > 0
    )


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
