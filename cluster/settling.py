"""Settling finished work: every step of it idempotent and in an order that survives a crash
anywhere (see "Crash safety" in cluster/dispatcher.py)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlmodel import Session

from cluster.broker import Broker, BrokerUnavailable, JobEntry
from cluster.contract import BatchItem, ImageResult
from cluster.events import JobEvent, nsfw_allowed, terminal_event
from cluster.registry import ModelSpec
from core import metrics
from core.errors import Conflict
from core.jobs import CANCELLED_BY_OWNER, JobStatus
from storage import gallery, ledger
from storage import jobs as job_repo
from storage.blobs import BlobStore, sha256_of
from storage.db import STORE_ERRORS, Store
from storage.gallery import ImageRead, NewImage
from storage.jobs import JobRead

log = logging.getLogger(__name__)

# Remember this many job ids whose terminal event this process published: a duplicate entry
# then does not publish again (across processes, front ends dedupe by job id).
ANNOUNCED_MEMORY = 10_000
# Waits between attempts to publish a settled job's delivery while the broker is down.
PUBLISH_RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0)
# Waits between tries of a store call while the store is unreachable (a PostgreSQL
# restarting): what a worker made is worth waiting for. After the last the error is raised;
# the job's entry, left pending, brings the job back.
STORE_RETRY_S = PUBLISH_RETRY_S

T = TypeVar("T")


class PatientStore(Store):
    """A ``Store`` whose calls ride out a store outage (STORE_RETRY_S), for settling and
    starting jobs; each call is one transaction, so a retry repeats nothing done."""

    async def __call__(self, fn: Callable[[Session], T], *, read_only: bool = False) -> T:
        for delay in STORE_RETRY_S:
            try:
                return await super().__call__(fn, read_only=read_only)
            except STORE_ERRORS as exc:
                first = (str(exc).splitlines() or [""])[0]
                log.warning("store unavailable (%s: %s); retrying in %g s",
                            type(exc).__name__, first, delay)
                await asyncio.sleep(delay)
        return await super().__call__(fn, read_only=read_only)


@dataclass
class Held:
    """A job a dispatcher holds: its entries (the first is the one it was admitted with;
    duplicates are acked with it), its row and its model."""

    entries: list[JobEntry]
    job: JobRead
    spec: ModelSpec | None = None  # resolved on admission
    cancel_requested: bool = False

    @property
    def model(self) -> ModelSpec:
        if self.spec is None:
            raise RuntimeError(f"job {self.job.id} was queued without a model")
        return self.spec

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def entry_ids(self) -> list[str]:
        return [e.entry_id for e in self.entries]

    def item(self) -> BatchItem:
        return BatchItem(self.job.id, self.job.request, nsfw_allowed(self.job.delivery),
                         self.job.prompts)


class Settler:
    """One dispatcher's settling: stores what a worker made, fails, cancels or re-queues a job,
    announces finished jobs to their front ends and acks their entries."""

    def __init__(
        self, *, name: str, broker: Broker, db: Store, blobs: BlobStore, max_attempts: int,
        redelivered: Callable[[str], object] = lambda job_id: None,
    ) -> None:
        """``redelivered(job_id)``: what the reconciler knows of re-announcing the job (it
        changes when it re-announces it), so a publish still retrying can stop."""
        self.name = name
        self.broker = broker
        self._db = db
        self.blobs = blobs
        self.max_attempts = max_attempts
        self._redelivered = redelivered
        self.settling: dict[str, Held] = {}  # stored, being announced and acked
        self.tasks: set[asyncio.Task[None]] = set()  # announcements in the background
        self.announced: OrderedDict[str, None] = OrderedDict()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def store_done(self, h: Held, results: list[ImageResult]) -> JobRead | None:
        """Images, then capture and succeeded (each idempotent); the caller then announces the
        job (delivery, ack). Returns the finished row, or None if the job is not finished."""
        # 1. PNGs into the content-addressed store: a repeat writes nothing new.
        keys = await asyncio.to_thread(lambda: [self.blobs.put(r.png) for r in results])
        images = [
            NewImage(
                index=r.index, seed=r.seed, width=r.width, height=r.height, blob_key=key,
                sha256=sha256_of(key), prompt=r.prompt, negative=r.negative,
                styles=(r.style,) if r.style else (), model=r.model, infotext=r.infotext,
            )
            for r, key in zip(results, keys, strict=True)
        ]

        # 2. One transaction: rows, capture, succeeded; unless the job finished meanwhile
        #    (cancelled by its owner, or settled by a dispatcher running a duplicate).
        def commit(session: Session) -> JobRead:
            job = job_repo.get_job(session=session, job_id=h.job_id)
            if job.status.finished:
                return job
            gallery.add_images(session=session, job_id=h.job_id, images=images)
            ledger.capture(session=session, job_id=h.job_id)
            return job_repo.set_status(
                session=session, job_id=h.job_id, status=JobStatus.succeeded
            )

        try:
            job = await self._db(commit)
        except Conflict as exc:
            # Lost a race with a cancel (its release won): the job is whatever it became.
            log.info("job %s: finished elsewhere while settling (%s)", h.job_id, exc)
            job = await self._db(lambda s: job_repo.get_job(session=s, job_id=h.job_id))
        if not job.status.finished:
            log.error("job %s is %s after settling; leaving its entry for a retry",
                      h.job_id, job.status.value)
            return None
        if job.status is JobStatus.succeeded:
            log.info("job %s: succeeded with %d images", h.job_id, len(images))
        return job

    async def cancelled(self, h: Held) -> None:
        """Cancelled and released (unless it finished meanwhile), then announced."""

        ended, job = await self._db(
            lambda s: job_repo.end_unpaid(
                session=s, job_id=h.job_id, status=JobStatus.cancelled,
                error=CANCELLED_BY_OWNER)
        )
        log.info("job %s: %s, credits released", h.job_id, job.status.value)
        if ended:
            metrics.JOBS_CANCELLED.inc()
            metrics.CREDITS_REFUNDED.inc(job.cost)
        await self.announce(job, h.entries)

    async def fail(
        self, h: Held, reason: str, *, dead_letter: bool = False, cause: str = "other"
    ) -> None:
        """Failed and refunded, then announced; ``dead_letter`` parks the entry for people.
        ``cause``: a short fixed word for the metrics (the reason is free text)."""

        ended, job = await self._db(lambda s: job_repo.end_unpaid(
            session=s, job_id=h.job_id, status=JobStatus.failed, error=reason))
        log.warning("job %s: failed (%s), credits released", h.job_id, reason)
        if ended:
            metrics.JOBS_FAILED.labels(cause).inc()
            metrics.CREDITS_REFUNDED.inc(job.cost)
        await self.announce(job, h.entries, dead_letter=reason if dead_letter else None)

    async def retry_or_fail(self, h: Held, reason: str, *, cause: str = "other") -> None:
        """Back to the queue for another worker while attempts remain, else failed."""
        if h.job.attempts >= self.max_attempts:
            await self.fail(
                h, f"gave up after {h.job.attempts} attempts: {reason}", dead_letter=True,
                cause=cause,
            )
            return

        # 1. Queued again in the store, 2. a fresh entry, 3. the old ones acked: a crash
        #    between the steps leaves a pending entry or a duplicate, both handled on reading.
        def requeue(session: Session) -> JobRead:
            job = job_repo.get_job(session=session, job_id=h.job_id)
            if job.status is JobStatus.running:
                job = job_repo.set_status(
                    session=session, job_id=h.job_id, status=JobStatus.queued
                )
            return job

        job = await self._db(requeue)
        if job.status.finished:
            await self.announce(job, h.entries)
            return
        log.warning("job %s: attempt %d failed (%s); queued again", h.job_id, h.job.attempts,
                    reason)
        metrics.JOBS_RETRIED.labels(cause).inc()
        await self.broker.jobs.enqueue(
            h.job_id, {"account": str(job.account_id), "retry": str(h.job.attempts)}
        )
        await self.ack(h.entries)

    async def announce(
        self, job: JobRead, entries: Sequence[JobEntry], *, dead_letter: str | None = None
    ) -> None:
        """Publish a finished job's terminal event to its front end, then ack its entries.
        A job its front end marked delivered is only acked."""
        if job.id not in self.announced and job.delivered_at is None:
            images: list[ImageRead] = []
            if job.status is JobStatus.succeeded:
                images = await self._db(
                    lambda s: gallery.list_job_images(session=s, job_id=job.id)
                )
            event = terminal_event(job, images)
            await self._publish_delivery(job.delivery.frontend, event)
            self.announced[job.id] = None
            while len(self.announced) > ANNOUNCED_MEMORY:
                self.announced.popitem(last=False)
            await self.hint(JobEvent(event.kind, job.id))
        if dead_letter is not None and entries:
            await self.broker.jobs.dead_letter(entries[0], dead_letter)
            entries = entries[1:]
        await self.ack(entries)

    def announce_soon(self, stored: list[tuple[Held, JobRead]]) -> None:
        """Announce settled jobs in a task of their own: riding out a broker outage must not
        keep the worker from its next batch. Their entries stay touched until acked."""
        for h, _ in stored:
            self.settling[h.job_id] = h

        async def announce() -> None:
            try:
                for h, job in stored:
                    await self.announce(job, h.entries)
            except BrokerUnavailable as exc:
                # Pending entries (or redeliver(), if the broker lost them) bring these back.
                log.warning("jobs %s: settled, not yet announced (%s)",
                            [h.job_id for h, _ in stored], exc)
            except Exception:
                log.exception("jobs %s: settled, announcing failed",
                              [h.job_id for h, _ in stored])
            finally:
                for h, _ in stored:
                    self.settling.pop(h.job_id, None)

        self._spawn(announce())

    async def _publish_delivery(self, frontend: str, event: JobEvent) -> None:
        """Publish, riding out a short broker outage (the job is settled); a longer one, or a
        restart losing the stream, is made good by redeliver() until the front end marks the
        job delivered. A retry is dropped once redeliver() has published the event or the
        front end has marked the job delivered: a late copy would repeat a delivered job."""
        redelivered = self._redelivered(event.job_id)
        for delay in (*PUBLISH_RETRY_S, None):
            try:
                await self.broker.deliveries.publish_delivery(frontend, event.to_fields())
                return
            except BrokerUnavailable as exc:
                if delay is None:
                    raise
                log.warning("job %s: delivery not published (%s); retrying in %g s",
                            event.job_id, exc, delay)
                await asyncio.sleep(delay)
            if self._redelivered(event.job_id) != redelivered:
                return
            job = await self._db(
                lambda s: job_repo.get_job(session=s, job_id=event.job_id), read_only=True
            )
            if job.delivered_at is not None:
                return

    async def ack(self, entries: Sequence[JobEntry]) -> None:
        for entry in entries:
            await self.broker.jobs.ack_job(entry.entry_id)

    async def hint(self, event: JobEvent) -> None:
        """A best-effort progress message (clients also poll the job row)."""
        try:
            await self.broker.progress.publish(event.job_id, event.to_fields())
        except BrokerUnavailable as exc:
            log.debug("job %s: progress not published: %s", event.job_id, exc)

