"""Reconciling the store with the broker, which may lose what it holds (a restart without
persistence, a failed enqueue): unfinished jobs the broker lost are enqueued again, and finished
jobs whose front end never confirmed them are announced again until it does."""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import timedelta

from sqlmodel import Session

from cluster.broker import Broker
from cluster.events import terminal_event
from core.jobs import JobStatus
from core.settings import Dispatch
from storage import gallery
from storage import jobs as job_repo
from storage.db import Store
from storage.gallery import ImageRead
from storage.models import utcnow

log = logging.getLogger(__name__)

# Queued jobs younger than this are left alone: the client may be between its commit and its
# XADD.
REQUEUE_GRACE_S = 5.0
REQUEUE_LIMIT = 10_000
# Durable delivery. A delivery lives in the broker until its front end reads and acks it, and a
# broker restart without persistence loses it (and so does an outage outlasting the publish
# retries). So the store keeps the truth: a finished job's delivered_at stays NULL until the
# front end has sent the result (Client.mark_delivered). Every reconcile pass re-announces
# finished jobs undelivered for longer than redeliver_grace_s (backing off per job, up to
# REDELIVER_MAX_BACKOFF_S), and a broker restart re-announces every undelivered job at once;
# only jobs finished within redeliver_window_s, redeliver_batch at a time. Front ends dedupe
# by job id.
REDELIVER_BATCH = 500
REDELIVER_MAX_BACKOFF_S = 3600.0
# Remember this many re-announced job ids.
REDELIVERED_MEMORY = 10_000


class Reconciler:
    """One dispatcher's passes over the store: requeue what the broker lost, re-announce what
    no front end confirmed."""

    def __init__(
        self, *, name: str, dispatch: Dispatch, broker: Broker, db: Store, lease_s: float,
        pass_interval_s: float, requeue_grace_s: float = REQUEUE_GRACE_S,
        redeliver_batch: int = REDELIVER_BATCH, busy: Callable[[], set[str]] = set,
    ) -> None:
        """``pass_interval_s``: how often ``redeliver`` is called (a job's back-off starts at
        the larger of it and the grace). ``busy``: ids of the jobs the dispatcher still holds
        or runs, which both passes leave to it. ``lease_s``: a running job whose row was not
        refreshed for this long has lost its dispatcher."""
        self.name = name
        self.broker = broker
        self._db = db
        self.lease_s = lease_s
        self.requeue_grace_s = requeue_grace_s
        self.redeliver_grace_s = dispatch.redeliver_grace_s
        self.redeliver_window_s = dispatch.redeliver_window_s
        self.pass_interval_s = pass_interval_s
        self.redeliver_batch = redeliver_batch
        self._busy = busy
        # Jobs re-announced by this process: (times, monotonic time of the next one due).
        self._redelivered: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def redelivered(self, job_id: str) -> tuple[int, float] | None:
        """How often (and until when) this process re-announced ``job_id``; None if never."""
        return self._redelivered.get(job_id)

    async def requeue_lost(self, *, everything: bool) -> int:
        """Re-enqueue unfinished jobs the broker has lost; returns how many were enqueued.

        ``everything`` (the broker restarted, its streams are gone): every queued job and every
        running job whose lease lapsed. Otherwise only when the store holds more unfinished
        jobs than the broker has entries (an enqueue failed, say), and then only jobs older than
        a few seconds. Duplicates are harmless: a job starts once (compare-and-set on its row)
        and an entry of a finished job is only acked.
        """
        now = utcnow()
        if not everything:
            # Counted from the queue's index first: a pass where the broker is in step with
            # the store (nearly all of them) reads no job row.
            unfinished = await self._db(
                lambda s: job_repo.in_flight_count(session=s), read_only=True
            )
            entries = await self.broker.jobs.queue_depth() + await self.broker.jobs.pending_count()
            if unfinished <= entries:
                return 0
        rows = await self._db(
            lambda s: job_repo.in_flight_jobs(session=s, limit=REQUEUE_LIMIT), read_only=True
        )
        stale_before = now - timedelta(seconds=self.lease_s)
        young = now - timedelta(seconds=self.requeue_grace_s)
        mine = self._busy()
        enqueued = 0
        for job_id, account_id, status, updated_at in rows:
            if job_id in mine:
                continue
            if status is JobStatus.running and updated_at >= stale_before:
                continue  # its dispatcher is alive; if it dies, a later pass finds it
            if not everything and status is JobStatus.queued and updated_at >= young:
                continue
            await self.broker.jobs.enqueue(job_id, {"account": str(account_id), "reconciled": "1"})
            enqueued += 1
        if enqueued:
            log.warning("dispatcher %s: re-enqueued %d unfinished jobs", self.name, enqueued)
        return enqueued

    async def redeliver(self, *, everything: bool) -> int:
        """Re-announce finished jobs whose front end has not marked them delivered; returns
        how many were published.

        ``everything`` (the broker restarted, its delivery streams are gone): every such job
        finished within the window, at once. Otherwise those finished more than
        ``redeliver_grace_s`` ago, each at most once per its backoff (the grace period,
        doubling per re-announcement up to REDELIVER_MAX_BACKOFF_S). Jobs this dispatcher
        holds or runs are left to it; one whose announcement is still retrying is published
        here, and that retry then stops. Dispatchers sharing a broker take turns through
        ``Broker.claim_redelivery``: each job is re-announced once per period, not once each.
        """
        now = utcnow()
        before = now if everything else now - timedelta(seconds=self.redeliver_grace_s)
        window = timedelta(seconds=self.redeliver_window_s)
        rows = await self._db(
            lambda s: job_repo.undelivered_jobs(
                session=s, finished_before=before, window=window, limit=self.redeliver_batch
            ),
            read_only=True,
        )
        mine = self._busy()
        clock = time.monotonic()
        published = 0
        for job in rows:
            if job.id in mine:
                continue
            times, due = self._redelivered.get(job.id, (0, 0.0))
            if not everything and clock < due:
                continue
            step = max(self.redeliver_grace_s, self.pass_interval_s)
            backoff = min(step * 2**times, REDELIVER_MAX_BACKOFF_S)
            if not await self.broker.flags.claim_redelivery(job.id, ttl_s=backoff):
                # Another dispatcher re-announces it this period (or did, and the broker kept
                # that announcement): look again one step later.
                self._remember(job.id, times, clock + step)
                continue
            # Read again now: a front end may have marked it delivered since the pass began
            # (a pass slowed by a busy store, or held up by a broker restart, would otherwise
            # re-announce a job its person already has).
            current, images = await self._db(
                functools.partial(_job_and_images, job_id=job.id), read_only=True
            )
            if current.delivered_at is not None:
                continue
            # No retry loop: a broker that is down now fails the pass, and the next one (or
            # the restart's) brings the job back.
            await self.broker.deliveries.publish_delivery(
                job.delivery.frontend, terminal_event(job, images).to_fields()
            )
            self._remember(job.id, times + 1, clock + backoff)
            published += 1
        if published:
            log.warning("dispatcher %s: re-announced %d finished jobs not marked delivered",
                        self.name, published)
        return published

    def _remember(self, job_id: str, times: int, due: float) -> None:
        self._redelivered[job_id] = (times, due)
        self._redelivered.move_to_end(job_id)
        while len(self._redelivered) > REDELIVERED_MEMORY:
            self._redelivered.popitem(last=False)


def _job_and_images(session: Session, *, job_id: str) -> tuple[job_repo.JobRead, list[ImageRead]]:
    job = job_repo.get_job(session=session, job_id=job_id)
    images = (gallery.list_job_images(session=session, job_id=job_id)
              if job.status is JobStatus.succeeded else [])
    return job, images
