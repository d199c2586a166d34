"""The dispatcher loop: reads jobs off the broker, admits them, batches compatible ones fairly
across accounts and places each batch on a worker slot. Running a batch (cluster/batchrun.py),
settling a job (cluster/settling.py) and reconciling the store with the broker
(cluster/reconcile.py) are rooms of their own; together every job settles exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster import keys
from cluster.autoscale import UNPLACED, Autoscaler, class_for
from cluster.batching import FairQueue, Waiting
from cluster.batchrun import BatchRecord, BatchRunner, find_job
from cluster.broker import Broker, BrokerUnavailable, JobEntry
from cluster.placement import WorkerPool, WorkerSlot, publish_loadable
from cluster.reconcile import REDELIVER_BATCH, REQUEUE_GRACE_S, Reconciler
from cluster.registry import ModelRegistry
from cluster.settling import Held, PatientStore, Settler
from core import metrics
from core.errors import AtelierError
from core.jobs import JobStatus
from core.logs import job_context
from core.recipe import batch_key, item_pixels
from core.settings import Dispatch
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.db import STORE_ERRORS, Store
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
# How often the gauges (queue depth per class, workers, deliveries pending) are refreshed.
METRICS_INTERVAL_S = 1.0
# What the loop waits out, retrying with backoff: the broker or the store unreachable.
OUTAGES: tuple[type[Exception], ...] = (BrokerUnavailable, *STORE_ERRORS)


@dataclass(frozen=True)
class Pacing:
    """How often a dispatcher looks at things: not settings an operator tunes (those are
    ``Dispatch``), but tests and benches shorten them."""

    window: int = 64  # queued entries read ahead; fairness between accounts is exact within it
    read_block_ms: int = 500
    progress_interval_s: float = 0.5
    cancel_poll_s: float = 0.25
    refresh_interval_s: float = 10.0
    epoch_check_s: float = 1.0
    reconcile_interval_s: float = 30.0
    heartbeat_s: float = 30.0
    drain_timeout_s: float = 30.0
    reconcile_grace_s: float = REQUEUE_GRACE_S
    redeliver_batch: int = REDELIVER_BATCH

class Dispatcher:
    """One dispatcher (a consumer of the broker's ``dispatchers`` group). Several may run
    against one broker and store; each job still runs and is charged once."""

    def __init__(
        self, *, dispatch: Dispatch, sessions: sessionmaker[Session], broker: Broker,
        blobs: BlobStore, workers: WorkerPool, models: ModelRegistry, name: str,
        pacing: Pacing | None = None, autoscaler: Autoscaler | None = None,
    ) -> None:
        """``dispatch``: batching and retries (``ATELIER_DISPATCH__*``); ``pacing``: how often
        it looks at things; ``autoscaler``: asks Ray for workers from the queue (off: None).
        Leases: a running job's row is refreshed every fifth of the
        broker's claim timeout and counts as abandoned after half of it."""
        pacing = pacing or Pacing()
        if pacing.window < 1:
            raise ValueError(f"pacing.window must be >= 1, got {pacing.window}")
        self.broker = broker
        self._workers = workers
        self.name = name
        self.models = models
        self.autoscaler = autoscaler
        # Batching knobs stay attributes: a running dispatcher may be retuned.
        self.gather_window_s = dispatch.gather_window_ms / 1000
        self.gather_gap_s = min(dispatch.gather_gap_ms / 1000, self.gather_window_s)
        self.max_batch_items = dispatch.max_batch_items
        self.pacing = pacing
        claim_s = broker.jobs.claim_idle_ms / 1000
        self.lease_s = claim_s / 2
        self.touch_interval_s = max(0.05, claim_s / 5)

        self._queue: FairQueue[tuple[object, ...]] = FairQueue()
        self._held: dict[str, Held] = {}  # read, waiting for a batch
        self._running: dict[str, Held] = {}  # in a batch on a worker
        self._tasks: set[asyncio.Task[None]] = set()  # batches running
        self._epoch: str | None = None
        self._due: dict[str, float] = {}
        self._worker_classes: set[str] = set()  # seen in the workers gauge, to zero later
        self._db = Store(sessions)
        # Entries read while the store was down, decided once it answers again.
        self._unadmitted: dict[str, JobEntry] = {}
        # Why the loop is waiting instead of dispatching (an outage), for /readyz; None: fine.
        self.trouble: str | None = None
        # Three rooms, by lifetime: reconciling the store with the broker (periodic passes),
        # settling a job once it ran or cannot run, running one batch on a worker slot.
        self.reconciler = Reconciler(
            name=name, dispatch=dispatch, broker=broker, db=self._db, lease_s=self.lease_s,
            pass_interval_s=pacing.reconcile_interval_s,
            requeue_grace_s=pacing.reconcile_grace_s, redeliver_batch=pacing.redeliver_batch,
            busy=self._busy,
        )
        # Starting and settling jobs wait out a store outage; the loop's own calls back off.
        patient = PatientStore(sessions)
        self.settle = Settler(
            name=name, broker=broker, db=patient, blobs=blobs,
            max_attempts=dispatch.max_attempts, redelivered=self.reconciler.redelivered,
        )
        self.runner = BatchRunner(
            dispatch=dispatch, broker=broker, workers=workers, settle=self.settle, db=patient,
            lease_s=self.lease_s, progress_interval_s=pacing.progress_interval_s,
            cancel_poll_s=pacing.cancel_poll_s, owner=name,
        )
        if autoscaler is not None:  # one demand for all dispatchers, run times measured
            autoscaler.bind(broker, name)
            self.runner.on_ran = autoscaler.run_times.observe

    @property
    def workers(self) -> WorkerPool:
        return self._workers

    @workers.setter
    def workers(self, pool: WorkerPool) -> None:
        """A new pool for what is placed from now on (tests and tools swap it)."""
        self._workers = self.runner.workers = pool

    def _busy(self) -> set[str]:
        return set(self._held.keys() | self._running.keys())

    @property
    def batches(self) -> deque[BatchRecord]:
        """Recent batches as placed (worker, jobs, model), newest last."""
        return self.runner.batches

    # The loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set, then let running batches finish (up to
        ``drain_timeout_s``). Entries read but not started stay pending for another
        dispatcher to claim."""
        log.info("dispatcher %s starting (claim timeout %d ms)", self.name,
                 self.broker.jobs.claim_idle_ms)
        await self.workers.refresh()
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    await self._housekeeping()
                    await self._step()
                    backoff = 0.1
                    self.trouble = None
                except OUTAGES as exc:
                    # An outage of either is waited out the same way; the store's raise
                    # (a PostgreSQL restarting) would otherwise end the loop.
                    what = "broker" if isinstance(exc, BrokerUnavailable) else "store"
                    first = (str(exc).splitlines() or [""])[0]
                    self.trouble = f"{what} unavailable ({type(exc).__name__}: {first})"[:300]
                    log.warning("dispatcher %s: %s; retrying in %.1f s", self.name,
                                self.trouble, backoff)
                    if what == "broker":
                        # Jobs read before the outage still go to workers as they free up
                        # (starting one needs the store, so not while the store is down).
                        self._dispatch()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            await self._drain()
            if self.autoscaler is not None:
                with contextlib.suppress(Exception):
                    await self.autoscaler.close()
            log.info("dispatcher %s stopped", self.name)

    async def _step(self) -> None:
        # 0. What was read while the store was down.
        if self._unadmitted:
            entries = list(self._unadmitted.values())
            self._unadmitted.clear()
            await self._admit(entries)
        # 1. Read ahead, up to the window; block only when nothing can be placed meanwhile.
        room = self.pacing.window - len(self._queue)
        placeable = self._placeable()
        if room > 0:
            if placeable:
                block = 0
            elif len(self._queue):
                block = 50  # jobs wait for a worker: come back soon to place them
            else:
                block = self.pacing.read_block_ms
            entries = await self.broker.jobs.read_jobs(self.name, count=room, block_ms=block)
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
            more = await self.broker.jobs.read_jobs(self.name, count=room - len(got), block_ms=0)
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
        if self._every("epoch", self.pacing.epoch_check_s):
            epoch = await self.broker.server_epoch()
            if self._epoch is None:
                # What this name held when its previous process stopped (killed mid-job, say):
                # taken back now, not after the claim timeout (start_attempts' owner check).
                own = await self.broker.jobs.own_pending_jobs(self.name, count=self.pacing.window)
                if own:
                    log.info("dispatcher %s: resuming %d entries of its previous process: %s",
                             self.name, len(own), [e.job_id for e in own])
                    await self._admit(own)
                self._epoch = epoch
                await self.reconciler.requeue_lost(everything=False)
            elif epoch != self._epoch:
                log.warning("dispatcher %s: the broker restarted (epoch %s -> %s); "
                            "re-enqueueing unfinished jobs and re-announcing undelivered ones",
                            self.name, self._epoch[:8], epoch[:8])
                self._epoch = epoch
                await self.reconciler.requeue_lost(everything=True)
                await self.reconciler.redeliver(everything=True)
        if self._every("claim", self.broker.jobs.claim_idle_ms / 2000):
            room = self.pacing.window - len(self._queue)
            if room > 0:
                claimed = await self.broker.jobs.claim_stale_jobs(self.name, count=room)
                if claimed:
                    log.info("dispatcher %s claimed %d stale entries: %s", self.name,
                             len(claimed), [e.job_id for e in claimed])
                    await self._admit(claimed)
        if self._every("refresh", self.pacing.refresh_interval_s):
            await self.workers.refresh()
            # What the workers can load, for submit's check (lapses if we stop refreshing).
            ttl_s = max(keys.WORKER_MODELS_TTL_S, 3 * self.pacing.refresh_interval_s)
            await publish_loadable(self.workers, self.broker, ttl_s)
        if self._every("reconcile", self.pacing.reconcile_interval_s):
            await self.reconciler.requeue_lost(everything=False)
            await self.reconciler.redeliver(everything=False)
        # Neither autoscaling nor metrics may stop the dispatching: failures are only logged.
        if self.autoscaler is not None and self._every(
            "autoscale", self.autoscaler.config.interval_s
        ):
            try:
                await self.autoscaler.tick(self.queued_by_class(), self.workers,
                                           self.queued_models())
            except Exception:
                log.exception("dispatcher %s: autoscaling failed; trying again", self.name)
        if self._every("metrics", METRICS_INTERVAL_S):
            try:
                await self._observe()
            except Exception as exc:
                log.warning("dispatcher %s: metrics not refreshed: %s", self.name, exc)
        if self._every("heartbeat", self.pacing.heartbeat_s):
            live = self.workers.live()
            log.info(
                "dispatcher %s: %d queued, %d running %s, %d/%d workers live",
                self.name, len(self._queue), len(self._running), sorted(self._running),
                len(live), len(self.workers.slots),
            )

    def queued_by_class(self) -> dict[str, int]:
        """Jobs waiting for a worker, by the device class each needs: the autoscaled classes
        when configured, else those of the workers known now ("unplaced": none fits)."""
        if self.autoscaler is not None:
            memory = self.autoscaler.memory_gb
        else:
            memory = {}
            for slot in self.workers.live():
                memory[slot.info.device_class] = slot.memory_gb(self.workers.host_memory_gb)
        counts: dict[str, int] = dict.fromkeys(memory, 0)
        for held in self._held.values():
            cls = class_for(held.model.min_vram_gb, memory) or UNPLACED
            counts[cls] = counts.get(cls, 0) + 1
        return counts

    def queued_models(self) -> dict[str, dict[str, int]]:
        """Jobs waiting for a worker, by device class (as queued_by_class) and model."""
        memory = self.autoscaler.memory_gb if self.autoscaler is not None else {}
        out: dict[str, dict[str, int]] = {}
        for held in self._held.values():
            cls = class_for(held.model.min_vram_gb, memory) or UNPLACED
            per = out.setdefault(cls, {})
            per[held.model.name] = per.get(held.model.name, 0) + 1
        return out

    async def _observe(self) -> None:
        """Refresh the gauges (the counters and histograms move where things happen)."""
        for cls, n in self.queued_by_class().items():
            metrics.QUEUE_DEPTH.labels(cls).set(n)
        states: dict[tuple[str, str], int] = {}
        for slot in self.workers.slots:
            state = "dead" if not slot.alive else "busy" if slot.batches else "idle"
            key = (slot.info.device_class, state)
            states[key] = states.get(key, 0) + 1
        for cls in {c for c, _ in states} | self._worker_classes:
            for state in ("idle", "busy", "dead"):
                metrics.WORKERS.labels(cls, state).set(states.get((cls, state), 0))
        self._worker_classes |= {c for c, _ in states}
        with contextlib.suppress(BrokerUnavailable):
            metrics.BROKER_BACKLOG.set(await self.broker.jobs.queue_depth())
        since = utcnow() - timedelta(seconds=self.reconciler.redeliver_window_s)
        pending = await self._db(
            lambda s: job_repo.undelivered_count(session=s, since=since), read_only=True
        )
        metrics.DELIVERIES_PENDING.set(pending)

    async def _touch(self) -> None:
        """Keep our entries from being claimed and our running jobs' leases fresh."""
        held = [*self._held.values(), *self._running.values(), *self.settle.settling.values()]
        entry_ids = [eid for h in held for eid in h.entry_ids] + list(self._unadmitted)
        if entry_ids:
            await self.broker.jobs.touch_jobs(self.name, entry_ids)
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
        deadline = time.monotonic() + self.pacing.drain_timeout_s
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
        if self.runner.sending:
            await asyncio.wait(self.runner.sending, timeout=5)

    # Admission ---------------------------------------------------------------------------

    async def _admit(self, entries: Sequence[JobEntry]) -> None:
        """Decide about newly read (or claimed) entries: settle what is already settled,
        refuse what can never run, queue the rest. While the store is down they are kept
        (and touched) to be decided again: deciding twice is harmless."""
        try:
            await self._decide(entries)
        except STORE_ERRORS:
            self._unadmitted.update((e.entry_id, e) for e in entries)
            raise

    async def _decide(self, entries: Sequence[JobEntry]) -> None:
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
            lambda s: {e.job_id: find_job(s, job_id=e.job_id) for e in fresh}, read_only=True
        )
        stale_before = utcnow() - timedelta(seconds=self.lease_s)
        # Two entries of one job in the same read (a reconcile or retry duplicate) are decided
        # once, together: deciding each would fail (and count) one job twice.
        by_job: dict[str, list[JobEntry]] = {}
        for entry in fresh:
            by_job.setdefault(entry.job_id, []).append(entry)
        for job_id, same in by_job.items():
            job = rows[job_id]
            if job is None:
                for entry in same:
                    log.warning("entry %s names job %s, which does not exist; dropping it",
                                entry.entry_id, job_id)
                    await self.broker.jobs.ack_job(entry.entry_id)
                continue
            with job_context(job.id):
                await self._admit_one(same, job, stale_before)

    async def _admit_one(
        self, entries: list[JobEntry], job: JobRead, stale_before: datetime
    ) -> None:
        # 1. Finished already (a crash after settling, or a duplicate): (re)announce, ack.
        if job.status.finished:
            await self.settle.announce(job, entries)
            return
        # 2. Running with a fresh lease: another dispatcher has it; this entry is a duplicate
        #    (unless it ran under our name: our previous process, killed; we take it back).
        if (job.status is JobStatus.running and job.updated_at >= stale_before
                and job.owner != self.name):
            for entry in entries:
                log.info("job %s: running elsewhere; acking duplicate entry %s", job.id,
                         entry.entry_id)
                await self.broker.jobs.ack_job(entry.entry_id)
            return
        held = Held(list(entries), job)
        # 3. Cancelled while queued.
        if await self.broker.flags.is_cancel_requested(job.id):
            await self.settle.cancelled(held)
            return
        # 4. Jobs that can never run: fail now, refunded.
        try:
            held.spec = self.models.get(job.request.model)
        except AtelierError:
            await self.settle.fail(
                held, f"model {job.request.model!r} is not available here",
                cause="model_unavailable",
            )
            return
        impossible = (self.autoscaler or self.workers).impossible(held.spec)
        if impossible is not None:
            await self.settle.fail(held, impossible, cause="no_fitting_worker")
            return
        # 5. Given up: started too often, or handed out too often (a job crashing dispatchers).
        if job.attempts >= self.settle.max_attempts:
            await self.settle.fail(
                held, f"gave up after {job.attempts} attempts", dead_letter=True, cause="gave_up"
            )
            return
        deliveries = max(e.deliveries for e in entries)
        if any(self.broker.jobs.over_delivered(e) for e in entries):
            await self.settle.fail(
                held, f"gave up after {deliveries} deliveries", dead_letter=True,
                cause="gave_up",
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
                task = asyncio.create_task(self._run(slot, held))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                break
            else:
                return  # nothing at the heads can be placed now

    async def _run(self, slot: WorkerSlot, held: list[Held]) -> None:
        try:
            await self.runner.run(slot, held)
        finally:
            for h in held:
                self._running.pop(h.job_id, None)

    # Helpers -----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[str]:
        return sorted(self._running)


