"""Running one batch on a worker slot: start its jobs (one compare-and-set each), call the worker,
relay progress, pass cancellations on, and settle every job with a reason its owner can read.
One ``BatchRunner`` per dispatcher; ``run`` lives as long as its batch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from cluster.broker import Broker, BrokerUnavailable
from cluster.contract import GenerationCancelled, ImageResult, WorkerFailed, WorkerLost, run_batch
from cluster.events import EventKind, JobEvent
from cluster.placement import WorkerPool, WorkerSlot
from cluster.registry import ModelLoadError
from cluster.settling import Held, Settler
from core import metrics
from core.errors import (
    ContentBlocked,
    ImageRejected,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    PromptTooLong,
)
from core.jobs import JobStatus
from core.logs import set_job
from core.settings import Dispatch
from storage import jobs as job_repo
from storage.db import Store
from storage.jobs import JobRead
from storage.models import utcnow

log = logging.getLogger(__name__)

# Recent batches kept for inspection (``Dispatcher.batches``).
BATCH_HISTORY = 1000
# Worker error codes whose message is about the job's input and written for its owner (the
# engine's JobRejected and input checks); any other failure is shown as a generic line.
USER_INPUT_CODES = frozenset(
    {InvalidRequest.code, PromptTooLong.code, ImageRejected.code, ContentBlocked.code}
)
# Worker error codes no retry can change: the job fails at once (the message is the person's).
PERMANENT_CODES = frozenset({ModelUnavailable.code})


@dataclass(frozen=True)
class BatchRecord:
    """One batch as placed: which worker, which jobs, when (monotonic seconds)."""

    worker_id: str
    job_ids: tuple[str, ...]
    model: str
    started: float


class BatchRunner:
    """Runs batches on worker slots for one dispatcher and settles their jobs."""

    def __init__(
        self, *, dispatch: Dispatch, broker: Broker, workers: WorkerPool, settle: Settler,
        db: Store, lease_s: float, progress_interval_s: float, cancel_poll_s: float,
        owner: str | None = None,
    ) -> None:
        """``lease_s``: a running job whose row was not refreshed for this long counts as
        abandoned, so a new start may take it over. ``owner``: the dispatcher's name, recorded
        on the jobs it starts (a restart under that name takes them back at once)."""
        self.owner = owner
        self.job_timeout_s = dispatch.job_timeout_s
        self.worker_lease_s = dispatch.worker_lease_s
        self.broker = broker
        self.workers = workers
        self.settle = settle
        self._db = db
        self.lease_s = lease_s
        self.progress_interval_s = progress_interval_s
        self.cancel_poll_s = cancel_poll_s
        self.batches: deque[BatchRecord] = deque(maxlen=BATCH_HISTORY)
        self.sending: set[asyncio.Task[None]] = set()  # progress ticks in flight
        # Told (model, device class, seconds per job) after each batch that ran to its end.
        self.on_ran: Callable[[str, str, float], None] | None = None

    async def run(self, slot: WorkerSlot, held: list[Held]) -> None:
        """Start ``held`` on ``slot`` (the jobs another dispatcher won or that were cancelled
        meanwhile are settled instead), run them as one call, settle each; the slot is handed
        back to the pool at the end, whatever happened."""
        model = held[0].model.name
        set_job(h.job_id for h in held)  # this task's log lines name its jobs
        try:
            started = await self._start(held)
            if not started:
                return
            self.batches.append(
                BatchRecord(slot.worker_id, tuple(h.job_id for h in started), model,
                            time.monotonic())
            )
            log.info("batch on %s: %s (%s)", slot.worker_id, [h.job_id for h in started], model)
            cls = slot.info.device_class
            metrics.BATCH_SIZE.labels(cls).observe(len(started))
            for h in started:
                if h.job.started_at is not None:
                    wait = (h.job.started_at - h.job.created_at).total_seconds()
                    metrics.JOB_WAIT.labels(cls).observe(max(0.0, wait))
            began = time.monotonic()
            try:
                await self._execute(slot, started)
            finally:
                metrics.WORKER_BUSY.labels(slot.worker_id, cls).inc(time.monotonic() - began)
            if self.on_ran is not None:
                self.on_ran(model, cls, (time.monotonic() - began) / len(started))
        except asyncio.CancelledError:
            raise
        except BrokerUnavailable as exc:
            # Maybe settled in the store but not announced or acked: the pending entries
            # bring the jobs back once the broker answers. (If Redis restarted meanwhile, the
            # entries are gone too; redeliver() re-announces the settled jobs from the store.)
            log.warning("batch on %s: broker unavailable mid-settle (%s): %s", slot.worker_id,
                        exc, [h.job_id for h in held])
        except Exception:
            # A bug or an outage mid-settle: the entries stay pending and the lease lapses,
            # so this or another dispatcher picks the jobs up again after the claim timeout.
            log.exception("batch on %s failed unexpectedly: %s", slot.worker_id,
                          [h.job_id for h in held])
        finally:
            self.workers.finished(slot, model)

    async def _start(self, held: list[Held]) -> list[Held]:
        """Mark the jobs running (one compare-and-set each: only one dispatcher wins a job)
        and count the attempt; settle those cancelled or taken meanwhile."""
        for h in held:
            try:
                if await self.broker.flags.is_cancel_requested(h.job_id):
                    h.cancel_requested = True
            except BrokerUnavailable:
                # The flags live in the broker: none can be set while it is down. The jobs
                # already held run now; their deliveries wait for the broker.
                pass
        live = [h for h in held if not h.cancel_requested]
        for h in held:
            if h.cancel_requested:
                await self.settle.cancelled(h)
        if not live:
            return []
        now = utcnow()
        stale_before = now - timedelta(seconds=self.lease_s)
        ids = [h.job_id for h in live]
        won = await self._db(
            lambda s: job_repo.start_attempts(session=s, job_ids=ids, now=now,
                                              stale_before=stale_before, owner=self.owner)
        )
        started = []
        for h in live:
            job = won.get(h.job_id)
            if job is not None:
                h.job = job
                started.append(h)
                continue
            current = await self._db(functools.partial(find_job, job_id=h.job_id))
            if current is not None and current.status.finished:
                await self.settle.announce(current, h.entries)
            else:
                log.info("job %s: taken by another dispatcher; acking entry", h.job_id)
                await self.settle.ack(h.entries)
        for h in started:
            await self.settle.hint(JobEvent(EventKind.started, h.job_id))
        return started

    async def _execute(self, slot: WorkerSlot, jobs: list[Held]) -> None:
        """Run ``jobs`` as one call on ``slot`` and settle each; isolates a poison job."""
        relay = self._progress_relay(jobs)
        ran = asyncio.Event()
        watch = asyncio.create_task(self._watch_cancels(slot, jobs, ran))
        try:
            async with asyncio.timeout(self.job_timeout_s):
                results = await run_batch(
                    slot.handle, [h.item() for h in jobs], on_progress=relay,
                    timeout_s=self.job_timeout_s, lease_s=self.worker_lease_s,
                    on_load=functools.partial(_count_load, slot.info.device_class),
                )
        except GenerationCancelled:
            for h in jobs:
                await self.settle.cancelled(h)
            return
        except WorkerFailed as exc:
            await self._worker_failed(slot, jobs, exc)
            return
        except WorkerLost as exc:
            if exc.reason != "lease":  # a lapsed lease says nothing bad about the worker
                self.workers.lost(slot, exc)
            for h in jobs:
                await self.settle.retry_or_fail(
                    h, f"the worker was lost ({exc.reason})", cause="worker_lost"
                )
            return
        except TimeoutError:
            for h in jobs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_await_ref(slot.handle.cancel.remote(h.job_id)), 5)
            self.workers.mark_dead(slot.worker_id, f"a batch ran past {self.job_timeout_s:g}s")
            for h in jobs:
                await self.settle.retry_or_fail(
                    h, f"timed out after {self.job_timeout_s:g}s", cause="timeout"
                )
            return
        finally:
            ran.set()
            await stop_task(watch)
        by_job: dict[str, list[ImageResult]] = {}
        for result in results:
            by_job.setdefault(result.job_id, []).append(result)
        # Every job the worker finished goes into the store first, which needs no broker, and
        # only then to its front end: a broker outage delays deliveries, never the settling.
        stored: list[tuple[Held, JobRead]] = []
        for h in jobs:
            images = by_job.get(h.job_id)
            if images:
                job = await self.settle.store_done(h, images)
                if job is not None:
                    stored.append((h, job))
        if stored:
            _count_done(slot.info.device_class, [job for _, job in stored])
            self.settle.announce_soon(stored)
        for h in jobs:
            if by_job.get(h.job_id):
                continue
            if h.cancel_requested:
                await self.settle.cancelled(h)
            else:
                await self.settle.retry_or_fail(
                    h, "the worker returned no images for this job", cause="no_images"
                )

    async def _worker_failed(self, slot: WorkerSlot, jobs: list[Held], exc: WorkerFailed) -> None:
        by_id = {h.job_id: h for h in jobs}
        if exc.error_code in PERMANENT_CODES:
            # No retry can mend it (the model's files are missing, say): the batch's jobs, all
            # of one model, fail now and are refunded.
            for h in jobs:
                await self.settle.fail(h, user_reason(exc, h.model.name))
            return
        if exc.job_id is not None and exc.job_id in by_id:
            # The worker named the job at fault (its input): fail it, run the others again.
            culprit = by_id[exc.job_id]
            await self.settle.fail(
                culprit, user_reason(exc, culprit.model.name), cause=failure_cause(exc)
            )
            others = [h for h in jobs if h.job_id != exc.job_id]
            if others:
                await self._execute(slot, others)
            return
        if len(jobs) > 1:
            # Unknown culprit: one by one, so one poison job takes only itself down.
            log.warning("batch %s failed (%s: %s); retrying its jobs one by one",
                        list(by_id), exc.error_code, exc.message)
            for h in jobs:
                await self._execute(slot, [h])
            return
        # A lone job and no job named: the worker's model, device or code failed, not the job's
        # input as far as anyone can tell. Another worker may do better; a job that fails on
        # every try is dead-lettered (and refunded) after max_attempts.
        # The full message (paths, exception text) is for the operator; the job's owner gets
        # a line that names the model but none of the server's internals.
        log.error("job %s: worker %s failed it (%s): %s", jobs[0].job_id, slot.worker_id,
                  exc.error_code, exc.message)
        await self.settle.retry_or_fail(
            jobs[0], user_reason(exc, jobs[0].model.name), cause=failure_cause(exc)
        )

    def _progress_relay(self, jobs: list[Held]) -> Callable[[int, int], None]:
        """Progress ticks for ``jobs``, sent beside the batch, never in its way: while one is
        in flight (the broker slow or down, each send retrying) later ticks are dropped."""
        last = 0.0
        sending: asyncio.Task[None] | None = None

        def relay(step: int, total: int) -> None:
            nonlocal last, sending
            now = time.monotonic()
            if step < total and now - last < self.progress_interval_s:
                return
            if sending is not None and not sending.done():
                return
            last = now
            events = [JobEvent(EventKind.progress, h.job_id, step=step, total=total)
                      for h in jobs if not h.cancel_requested]
            sending = asyncio.create_task(self._hints(events))
            self.sending.add(sending)
            sending.add_done_callback(self.sending.discard)

        return relay

    async def _hints(self, events: Sequence[JobEvent]) -> None:
        try:
            for event in events:
                await self.settle.hint(event)
        except Exception as exc:  # a tick is not worth a crash; nobody awaits this task
            log.debug("progress ticks not published: %r", exc)

    async def _watch_cancels(
        self, slot: WorkerSlot, jobs: list[Held], ran: asyncio.Event
    ) -> None:
        """Pass cancel flags on to the worker, which stops the job at its next step; ends
        once ``ran`` is set (no cancellation needed, which a client library might swallow)."""
        while not ran.is_set():
            for h in jobs:
                if h.cancel_requested:
                    continue
                try:
                    flagged = await self.broker.flags.is_cancel_requested(h.job_id)
                except BrokerUnavailable:
                    continue
                if not flagged:
                    continue
                h.cancel_requested = True
                log.info("job %s: cancel requested; telling worker %s", h.job_id, slot.worker_id)
                try:
                    await asyncio.wait_for(_await_ref(slot.handle.cancel.remote(h.job_id)), 5)
                except Exception as exc:  # the worker may be gone; the batch then fails
                    log.warning("job %s: could not tell the worker to cancel: %s", h.job_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ran.wait(), self.cancel_poll_s)


def _count_load(device_class: str, model: str, seconds: float) -> None:
    metrics.MODEL_LOADS.labels(model, device_class).inc()
    metrics.MODEL_LOAD_TIME.labels(model).observe(seconds)


def _count_done(device_class: str, jobs: list[JobRead]) -> None:
    """Latency and credits of the jobs this batch settled as succeeded (now)."""
    now = utcnow()
    for job in jobs:
        if job.status is not JobStatus.succeeded:
            continue
        metrics.JOBS_DONE.labels(device_class).inc()
        metrics.CREDITS_CHARGED.inc(job.cost)
        metrics.JOB_LATENCY.labels(device_class).observe(
            max(0.0, (now - job.created_at).total_seconds())
        )
        if job.started_at is not None:
            metrics.JOB_RUN.labels(device_class).observe(
                max(0.0, (now - job.started_at).total_seconds())
            )


def user_reason(exc: WorkerFailed, model: str) -> str:
    """What a job's owner is told when the worker failed it: the worker's own message only
    where it is about the job's input (written for its owner); otherwise a plain line
    without the server's paths or exception text, which the operator log keeps."""
    if exc.error_code in USER_INPUT_CODES or exc.error_code in PERMANENT_CODES:
        return exc.message
    if exc.error_code == ModelLoadError.code:
        return f"model {model!r} could not be loaded on the worker; the operator has been told"
    return (f"image generation with model {model!r} failed on the worker; "
            "the operator has been told")


def failure_cause(exc: WorkerFailed) -> str:
    """A fixed word per kind of worker failure, for the failures-by-reason metric."""
    if exc.error_code in USER_INPUT_CODES:
        return "input"
    if exc.error_code == ModelLoadError.code:
        return "model_load"
    return "worker_error"


def find_job(session: Session, *, job_id: str) -> JobRead | None:
    try:
        return job_repo.get_job(session=session, job_id=job_id)
    except NotFound:
        return None


async def _await_ref(ref: Any) -> Any:
    return await ref


async def stop_task(task: asyncio.Task[Any], timeout_s: float = 5.0) -> None:
    """Cancel a helper task and give it ``timeout_s`` to end. Never suppresses the caller's
    own cancellation (``asyncio.wait`` neither raises the task's error nor swallows ours)."""
    task.cancel()
    await asyncio.wait({task}, timeout=timeout_s)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("helper task ended with %r", task.exception())


