"""The dispatcher: reads jobs off the broker, batches compatible ones fairly across accounts,
places them on worker actors, relays progress, and settles every job exactly once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster import keys
from cluster.batching import FairQueue, Waiting
from cluster.broker import Broker, BrokerUnavailable, JobEntry
from cluster.engine import GenerationCancelled, ImageResult, batch_key, item_pixels
from cluster.events import EventKind, JobEvent
from cluster.placement import WorkerPool, WorkerSlot, publish_loadable
from cluster.registry import ModelLoadError, ModelRegistry
from cluster.settling import REDELIVER_BATCH, Held, Settler, Store
from cluster.worker import WorkerFailed, WorkerLost, run_batch
from core.errors import (
    AtelierError,
    ContentBlocked,
    ImageRejected,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    PromptTooLong,
)
from core.jobs import JobStatus
from core.settings import Settings
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.jobs import JobRead
from storage.models import utcnow

log = logging.getLogger(__name__)

# Crash safety. Settling a job is a recipe of idempotent steps, always in this order: PNGs into
# the content-addressed blob store; ONE transaction writing the image rows, capturing the
# credits and marking the job succeeded; the delivery event; the ack. A dispatcher killed
# between two steps leaves its entry pending; after the broker's claim timeout another
# dispatcher claims it, reads the row and does only what is missing (a succeeded job gets its
# delivery re-published, which front ends dedupe by job id). Failures and cancellations follow
# the same shape: release + status in one transaction, delivery, then ack (or dead-letter).
# A batch's jobs are all stored before any is announced: stores need no broker, so a broker
# outage (publishing retries for a minute) holds up deliveries, never what the worker made.
#
# Ownership. A dispatcher starts a job with a compare-and-set on its row (queued -> running,
# or running with a lapsed lease -> running), so of two dispatchers holding entries of one job
# only one runs it. While running, it renews the lease (the row's updated_at) every fifth of
# the claim timeout and touches its entries; a lease older than half the claim timeout counts
# as abandoned. Duplicate entries (a retry, a reconcile) of a job running elsewhere are acked.
#
# Failure detection. A worker that dies or whose node goes away surfaces as WorkerLost from
# run_batch: the job is queued again for another worker, up to max_attempts, then failed,
# refunded and dead-lettered. So is a job whose worker failed without naming it (its model or
# device failed, not its input); a job the worker names (bad input) fails at once. How fast Ray
# notices a vanished node is Ray's health check, set on the head node (environment variables
# read at `ray start`): RAY_health_check_period_ms, RAY_health_check_timeout_ms and
# RAY_health_check_failure_threshold; actors on a silent node fail after about period x
# threshold. job_timeout_s bounds every wait for a worker event regardless.

# Ray namespace and actor-name prefix that `atelier worker` uses, so dispatchers in other
# processes find the workers (named actors are only visible within their namespace).
RAY_NAMESPACE = "atelier"
WORKER_NAME_PREFIX = "atelier-worker"
# Recent batches kept for inspection (``Dispatcher.batches``).
BATCH_HISTORY = 1000
# The reconciler leaves queued jobs younger than this alone: the client may be between its
# commit and its XADD.
RECONCILE_GRACE_S = 5.0
RECONCILE_LIMIT = 10_000
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


class Dispatcher:
    """One dispatcher (a consumer of the broker's ``dispatchers`` group). Several may run
    against one broker and store; each job still runs and is charged once."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: sessionmaker[Session],
        broker: Broker,
        blobs: BlobStore,
        workers: WorkerPool,
        name: str,
        models: ModelRegistry | None = None,
        gather_window_s: float | None = None,
        gather_gap_s: float | None = None,
        job_timeout_s: float | None = None,
        max_attempts: int | None = None,
        window: int = 64,
        max_batch_items: int | None = None,
        worker_lease_s: float | None = None,
        progress_interval_s: float = 0.5,
        cancel_poll_s: float = 0.25,
        refresh_interval_s: float = 10.0,
        epoch_check_s: float = 1.0,
        reconcile_interval_s: float = 30.0,
        heartbeat_s: float = 30.0,
        read_block_ms: int = 500,
        drain_timeout_s: float = 30.0,
        reconcile_grace_s: float = RECONCILE_GRACE_S,
        redeliver_grace_s: float | None = None,
        redeliver_window_s: float | None = None,
        redeliver_batch: int = REDELIVER_BATCH,
    ) -> None:
        """Options left None come from ``settings.dispatch`` (``ATELIER_DISPATCH__*``).

        ``window``: at most this many queued entries are read ahead; fairness between
        accounts is exact within it. Gathering: once jobs arrive, more are read while each
        comes within ``gather_gap_s`` of the last, for at most ``gather_window_s`` in all.
        Leases: a running job's row is refreshed every fifth of the broker's claim timeout and
        counts as abandoned after half of it."""
        opts = settings.dispatch
        if gather_window_s is None:
            gather_window_s = opts.gather_window_ms / 1000
        if gather_gap_s is None:
            gather_gap_s = min(opts.gather_gap_ms / 1000, gather_window_s)
        job_timeout_s = opts.job_timeout_s if job_timeout_s is None else job_timeout_s
        max_attempts = opts.max_attempts if max_attempts is None else max_attempts
        max_batch_items = opts.max_batch_items if max_batch_items is None else max_batch_items
        worker_lease_s = opts.worker_lease_s if worker_lease_s is None else worker_lease_s
        if redeliver_grace_s is None:
            redeliver_grace_s = opts.redeliver_grace_s
        if redeliver_window_s is None:
            redeliver_window_s = opts.redeliver_window_s
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if window < 1 or max_batch_items < 1:
            raise ValueError(f"window and max_batch_items must be >= 1, got {window}, "
                             f"{max_batch_items}")
        self.settings = settings
        self.broker = broker
        self.workers = workers
        self.name = name
        self.models = models if models is not None else ModelRegistry.load(settings)
        self.gather_window_s = gather_window_s
        self.gather_gap_s = gather_gap_s
        self.job_timeout_s = job_timeout_s
        self.window = window
        self.max_batch_items = max_batch_items
        self.worker_lease_s = worker_lease_s
        self.progress_interval_s = progress_interval_s
        self.cancel_poll_s = cancel_poll_s
        self.refresh_interval_s = refresh_interval_s
        self.epoch_check_s = epoch_check_s
        self.reconcile_interval_s = reconcile_interval_s
        self.heartbeat_s = heartbeat_s
        self.read_block_ms = read_block_ms
        self.drain_timeout_s = drain_timeout_s
        self.reconcile_grace_s = reconcile_grace_s
        claim_s = broker.claim_idle_ms / 1000
        self.lease_s = claim_s / 2
        self.touch_interval_s = max(0.05, claim_s / 5)

        self.batches: deque[BatchRecord] = deque(maxlen=BATCH_HISTORY)
        self._queue: FairQueue[tuple[object, ...]] = FairQueue()
        self._held: dict[str, Held] = {}  # read, waiting for a batch
        self._running: dict[str, Held] = {}  # in a batch on a worker
        self._tasks: set[asyncio.Task[None]] = set()  # batches running
        self._sending: set[asyncio.Task[None]] = set()  # progress ticks in flight
        self._epoch: str | None = None
        self._due: dict[str, float] = {}
        self._db = Store(session_factory)
        # What happens to a job once it ran (or cannot run): stored, failed, re-queued,
        # announced; and finished jobs re-announced until their front end confirms them.
        self.settle = Settler(
            name=name, broker=broker, db=self._db, blobs=blobs, max_attempts=max_attempts,
            redeliver_grace_s=redeliver_grace_s, redeliver_window_s=redeliver_window_s,
            pass_interval_s=reconcile_interval_s, redeliver_batch=redeliver_batch,
            busy=lambda: self._held.keys() | self._running.keys(),
        )

    # The loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set, then let running batches finish (up to
        ``drain_timeout_s``). Entries read but not started stay pending for another
        dispatcher to claim."""
        log.info("dispatcher %s starting (claim timeout %d ms)", self.name,
                 self.broker.claim_idle_ms)
        await self.workers.refresh()
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    await self._housekeeping()
                    await self._step()
                    backoff = 0.1
                except BrokerUnavailable as exc:
                    log.warning("dispatcher %s: broker unavailable (%s); retrying in %.1f s",
                                self.name, exc, backoff)
                    # Jobs read before the outage still go to workers as they free up.
                    self._dispatch()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self._drain()
            log.info("dispatcher %s stopped", self.name)

    async def _step(self) -> None:
        # 1. Read ahead, up to the window; block only when nothing can be placed meanwhile.
        room = self.window - len(self._queue)
        placeable = self._placeable()
        if room > 0:
            if placeable:
                block = 0
            elif len(self._queue):
                block = 50  # jobs wait for a worker: come back soon to place them
            else:
                block = self.read_block_ms
            entries = await self.broker.read_jobs(self.name, count=room, block_ms=block)
            if entries and self.workers.idle():
                # 2. Jobs submitted together should arrive together: keep reading while they
                # keep coming. Only worth it while a worker waits for them; a busy pool
                # gathers the queue by itself.
                entries += await self._gather(room - len(entries))
            if entries:
                await self._admit(entries)
        elif not placeable:
            await asyncio.sleep(0.05)
        # 3. Batches for every idle worker that can take one.
        self._dispatch()

    async def _gather(self, room: int) -> list[JobEntry]:
        """Entries arriving each within ``gather_gap_s`` of the last, for at most
        ``gather_window_s``: a lone job waits one gap, a burst is read whole."""
        got: list[JobEntry] = []
        deadline = time.monotonic() + self.gather_window_s
        while room - len(got) > 0:
            wait = min(self.gather_gap_s, deadline - time.monotonic())
            if wait < 0.001:
                break
            # Sleep here, then look without blocking: Redis checks a blocked read's timeout
            # only about every 100 ms (its hz), far coarser than a gap.
            await asyncio.sleep(wait)
            more = await self.broker.read_jobs(self.name, count=room - len(got), block_ms=0)
            if not more:
                break
            got += more
        return got

    def _every(self, what: str, interval_s: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(what, 0.0):
            return False
        self._due[what] = now + interval_s
        return True

    async def _housekeeping(self) -> None:
        if self._every("touch", self.touch_interval_s):
            await self._touch()
        if self._every("epoch", self.epoch_check_s):
            epoch = await self.broker.server_epoch()
            if self._epoch is None:
                # What this name held when its previous process stopped (killed mid-job, say):
                # taken back now, not after the claim timeout (start_attempts' owner check).
                own = await self.broker.own_pending_jobs(self.name, count=self.window)
                if own:
                    log.info("dispatcher %s: resuming %d entries of its previous process: %s",
                             self.name, len(own), [e.job_id for e in own])
                    await self._admit(own)
                self._epoch = epoch
                await self.reconcile(everything=False)
            elif epoch != self._epoch:
                log.warning("dispatcher %s: the broker restarted (epoch %s -> %s); "
                            "re-enqueueing unfinished jobs and re-announcing undelivered ones",
                            self.name, self._epoch[:8], epoch[:8])
                self._epoch = epoch
                await self.reconcile(everything=True)
                await self.settle.redeliver(everything=True)
        if self._every("claim", self.broker.claim_idle_ms / 2000):
            room = self.window - len(self._queue)
            if room > 0:
                claimed = await self.broker.claim_stale_jobs(self.name, count=room)
                if claimed:
                    log.info("dispatcher %s claimed %d stale entries: %s", self.name,
                             len(claimed), [e.job_id for e in claimed])
                    await self._admit(claimed)
        if self._every("refresh", self.refresh_interval_s):
            await self.workers.refresh()
            # What the workers can load, for submit's check (lapses if we stop refreshing).
            ttl_s = max(keys.WORKER_MODELS_TTL_S, 3 * self.refresh_interval_s)
            await publish_loadable(self.workers, self.broker, ttl_s)
        if self._every("reconcile", self.reconcile_interval_s):
            await self.reconcile(everything=False)
            await self.settle.redeliver(everything=False)
        if self._every("heartbeat", self.heartbeat_s):
            live = self.workers.live()
            log.info(
                "dispatcher %s: %d queued, %d running %s, %d/%d workers live",
                self.name, len(self._queue), len(self._running), sorted(self._running),
                len(live), len(self.workers.slots),
            )

    async def _touch(self) -> None:
        """Keep our entries from being claimed and our running jobs' leases fresh."""
        held = [*self._held.values(), *self._running.values(), *self.settle.settling.values()]
        entry_ids = [eid for h in held for eid in h.entry_ids]
        if entry_ids:
            await self.broker.touch_jobs(self.name, entry_ids)
        running = list(self._running)
        if running:
            now = utcnow()
            await self._db(lambda s: job_repo.refresh_leases(session=s, job_ids=running, now=now))

    async def _drain(self) -> None:
        """Let running batches finish, then the announcements they started, within
        ``drain_timeout_s`` in all; what is left is cancelled (its entries stay pending)."""
        if self._tasks:
            log.info("dispatcher %s: waiting for %d running batches", self.name,
                     len(self._tasks))
        deadline = time.monotonic() + self.drain_timeout_s
        for tasks in (self._tasks, self.settle.tasks):
            if not tasks:
                continue
            _, pending = await asyncio.wait(
                set(tasks), timeout=max(0.0, deadline - time.monotonic())
            )
            for task in pending:
                task.cancel()  # a worker stops at its next step
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._sending:
            await asyncio.wait(self._sending, timeout=5)

    # Admission ---------------------------------------------------------------------------

    async def _admit(self, entries: Sequence[JobEntry]) -> None:
        """Decide about newly read (or claimed) entries: settle what is already settled,
        refuse what can never run, queue the rest."""
        fresh: list[JobEntry] = []
        for entry in entries:
            mine = (self._held.get(entry.job_id) or self._running.get(entry.job_id)
                    or self.settle.settling.get(entry.job_id))
            if mine is not None:
                # Another entry of a job we hold (a reconcile or retry duplicate): acked with it.
                if entry.entry_id not in mine.entry_ids:
                    mine.entries.append(entry)
                continue
            fresh.append(entry)
        if not fresh:
            return
        rows = await self._db(
            lambda s: {e.job_id: _find_job(s, job_id=e.job_id) for e in fresh}, read_only=True
        )
        stale_before = utcnow() - timedelta(seconds=self.lease_s)
        for entry in fresh:
            job = rows[entry.job_id]
            if job is None:
                log.warning("entry %s names job %s, which does not exist; dropping it",
                            entry.entry_id, entry.job_id)
                await self.broker.ack_job(entry.entry_id)
                continue
            mine = self._held.get(entry.job_id)
            if mine is not None:  # two entries of one job in the same read
                mine.entries.append(entry)
                continue
            await self._admit_one(entry, job, stale_before)

    async def _admit_one(self, entry: JobEntry, job: JobRead, stale_before: datetime) -> None:
        # 1. Finished already (a crash after settling, or a duplicate): (re)announce, ack.
        if job.status.finished:
            await self.settle.announce(job, [entry])
            return
        # 2. Running with a fresh lease: another dispatcher has it; this entry is a duplicate
        #    (unless it ran under our name: our previous process, killed; we take it back).
        if (job.status is JobStatus.running and job.updated_at >= stale_before
                and job.owner != self.name):
            log.info("job %s: running elsewhere; acking duplicate entry %s", job.id,
                     entry.entry_id)
            await self.broker.ack_job(entry.entry_id)
            return
        held = Held([entry], job)
        # 3. Cancelled while queued.
        if await self.broker.is_cancel_requested(job.id):
            await self.settle.cancelled(held)
            return
        # 4. Jobs that can never run: fail now, refunded.
        try:
            held.spec = self.models.get(job.request.model)
        except AtelierError:
            await self.settle.fail(held, f"model {job.request.model!r} is not available here")
            return
        impossible = self.workers.impossible(held.spec)
        if impossible is not None:
            await self.settle.fail(held, impossible)
            return
        # 5. Given up: started too often, or handed out too often (a job crashing dispatchers).
        if job.attempts >= self.settle.max_attempts:
            await self.settle.fail(held, f"gave up after {job.attempts} attempts", dead_letter=True)
            return
        if self.broker.over_delivered(entry):
            await self.settle.fail(
                held, f"gave up after {entry.deliveries} deliveries", dead_letter=True
            )
            return
        # 6. Wait for a batch.
        self._held[job.id] = held
        self._queue.add(
            Waiting(job.id, job.account_id, batch_key(job.request), item_pixels(job.request), held)
        )

    # Placement ---------------------------------------------------------------------------

    def _placeable(self) -> bool:
        return any(self.workers.choose(self._payload(h).model) for h in self._queue.heads())

    @staticmethod
    def _payload(waiting: Waiting[Any]) -> Held:
        held = waiting.payload
        if not isinstance(held, Held):
            raise TypeError(f"queue entry for job {waiting.job_id} carries no job")
        return held

    def _dispatch(self) -> None:
        """Start one batch per idle worker while queued jobs can be placed, each batch led by
        the oldest job of the account whose turn it is."""
        while len(self._queue):
            for head in self._queue.heads():
                slot = self.workers.choose(self._payload(head).model)
                if slot is None:
                    continue
                batch = self._queue.take_batch(
                    head, max_pixels=slot.info.max_batch_pixels, max_items=self.max_batch_items
                )
                held = [self._payload(w) for w in batch]
                for h in held:
                    del self._held[h.job_id]
                    self._running[h.job_id] = h
                self.workers.started(slot)
                task = asyncio.create_task(self._run_batch(slot, held))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                break
            else:
                return  # nothing at the heads can be placed now

    # Running a batch ---------------------------------------------------------------------

    async def _run_batch(self, slot: WorkerSlot, held: list[Held]) -> None:
        model = held[0].model.name
        try:
            started = await self._start(held)
            if not started:
                return
            self.batches.append(
                BatchRecord(slot.worker_id, tuple(h.job_id for h in started), model,
                            time.monotonic())
            )
            log.info("batch on %s: %s (%s)", slot.worker_id, [h.job_id for h in started], model)
            await self._execute(slot, started)
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
            for h in held:
                self._running.pop(h.job_id, None)

    async def _start(self, held: list[Held]) -> list[Held]:
        """Mark the jobs running (one compare-and-set each: only one dispatcher wins a job)
        and count the attempt; settle those cancelled or taken meanwhile."""
        for h in held:
            try:
                if await self.broker.is_cancel_requested(h.job_id):
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
                                              stale_before=stale_before, owner=self.name)
        )
        started = []
        for h in live:
            job = won.get(h.job_id)
            if job is not None:
                h.job = job
                started.append(h)
                continue
            current = await self._db(functools.partial(_find_job, job_id=h.job_id))
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
                await self.settle.retry_or_fail(h, f"the worker was lost ({exc.reason})")
            return
        except TimeoutError:
            for h in jobs:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_await_ref(slot.handle.cancel.remote(h.job_id)), 5)
            self.workers.mark_dead(slot.worker_id, f"a batch ran past {self.job_timeout_s:g}s")
            for h in jobs:
                await self.settle.retry_or_fail(h, f"timed out after {self.job_timeout_s:g}s")
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
            self.settle.announce_soon(stored)
        for h in jobs:
            if by_job.get(h.job_id):
                continue
            if h.cancel_requested:
                await self.settle.cancelled(h)
            else:
                await self.settle.retry_or_fail(h, "the worker returned no images for this job")

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
            await self.settle.fail(culprit, user_reason(exc, culprit.model.name))
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
        await self.settle.retry_or_fail(jobs[0], user_reason(exc, jobs[0].model.name))

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
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

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
                    flagged = await self.broker.is_cancel_requested(h.job_id)
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

    # Reconciling the broker with the store -----------------------------------------------

    async def reconcile(self, *, everything: bool) -> int:
        """Re-enqueue unfinished jobs the broker has lost; returns how many were enqueued.

        ``everything`` (the broker restarted, its streams are gone): every queued job and every
        running job whose lease lapsed. Otherwise only when the store holds more unfinished
        jobs than the broker has entries (an enqueue failed, say), and then only jobs older than
        a few seconds. Duplicates are harmless: a job starts once (compare-and-set on its row)
        and an entry of a finished job is only acked.
        """
        now = utcnow()
        rows = await self._db(
            lambda s: job_repo.in_flight_jobs(session=s, limit=RECONCILE_LIMIT), read_only=True
        )
        if not everything:
            entries = await self.broker.queue_depth() + await self.broker.pending_count()
            if len(rows) <= entries:
                return 0
        stale_before = now - timedelta(seconds=self.lease_s)
        young = now - timedelta(seconds=self.reconcile_grace_s)
        mine = self._held.keys() | self._running.keys()
        enqueued = 0
        for job_id, account_id, status, updated_at in rows:
            if job_id in mine:
                continue
            if status is JobStatus.running and updated_at >= stale_before:
                continue  # its dispatcher is alive; if it dies, a later pass finds it
            if not everything and status is JobStatus.queued and updated_at >= young:
                continue
            await self.broker.enqueue(job_id, {"account": str(account_id), "reconciled": "1"})
            enqueued += 1
        if enqueued:
            log.warning("dispatcher %s: re-enqueued %d unfinished jobs", self.name, enqueued)
        return enqueued

    # Helpers -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[str]:
        return sorted(self._running)


# Helpers.


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


def _find_job(session: Session, *, job_id: str) -> JobRead | None:
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


# Running as its own process ---------------------------------------------------------------------


async def run_dispatcher(
    settings: Settings,
    *,
    name: str | None = None,
    stop: asyncio.Event | None = None,
    ray_address: str | None = "auto",
    namespace: str = RAY_NAMESPACE,
    worker_prefix: str = WORKER_NAME_PREFIX,
    claim_idle_ms: int | None = None,
    **options: Any,
) -> None:
    """Run one dispatcher until ``stop`` is set (or SIGTERM/SIGINT): connects to Redis (no
    in-process fallback: other processes must share the queue), the migrated store and Ray
    (``ray_address``, e.g. "auto" or "ray://head:10001"), finding workers by name prefix."""
    import ray

    from cluster.broker import connect_broker
    from cluster.placement import ray_discovery
    from core.errors import ConfigError
    from storage.db import check_migrated, make_engine, session_factory

    if settings.redis_url is None:
        raise ConfigError("a dispatcher process needs ATELIER_REDIS_URL (a shared broker)")
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    # 1. Store, broker, Ray.
    engine = make_engine(settings.db_url)
    check_migrated(engine)
    broker = await connect_broker(
        settings.redis_url, claim_idle_ms=claim_idle_ms or settings.dispatch.claim_timeout_ms,
        fallback=False,
    )
    if not ray.is_initialized():
        await asyncio.to_thread(
            ray.init, address=ray_address, namespace=namespace, log_to_driver=False
        )
    # 2. Stop on a signal.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    # 3. Dispatch.
    try:
        pool = WorkerPool(discover=ray_discovery(worker_prefix))
        dispatcher = Dispatcher(
            settings=settings, session_factory=session_factory(engine), broker=broker,
            blobs=BlobStore.from_settings(settings), workers=pool, name=name, **options,
        )
        await dispatcher.run(stop)
    finally:
        await broker.close()
        engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """``python -m cluster.dispatcher --name d1``: one dispatcher process (settings from the
    ``ATELIER_*`` environment)."""
    from core.settings import load_settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--name", default=None, help="consumer name (default: host-pid)")
    parser.add_argument("--ray-address", default="auto")
    parser.add_argument("--claim-idle-ms", type=int, default=None)
    parser.add_argument("--worker-prefix", default=WORKER_NAME_PREFIX)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(
        run_dispatcher(
            load_settings(), name=args.name, ray_address=args.ray_address,
            claim_idle_ms=args.claim_idle_ms, worker_prefix=args.worker_prefix,
        )
    )


if __name__ == "__main__":
    main()
