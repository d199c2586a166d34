"""The delivery loop: read the front end's stream, hand each finished job to the platform, then
ack. At-least-once from the broker, once to the person: a marker per job id skips repeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bots.common.state import DELIVERED, DELIVERED_TTL_S, BotState
from cluster.broker import Broker, BrokerUnavailable, DeliveryEntry
from cluster.events import JobEvent
from cluster.supervise import supervise
from core.errors import AtelierError

log = logging.getLogger(__name__)

Handler = Callable[[JobEvent], Awaitable[None]]
# Tells the store a job's result reached its user (Client.mark_delivered): until then the
# dispatchers re-announce it, so a delivery lost with the broker comes back.
MarkDelivered = Callable[[str], Awaitable[object]]

DEFAULT_BLOCK_MS = 2_000
DEFAULT_CLAIM_EVERY_S = 30.0
DEFAULT_GRACE_S = 10.0
# A handler failing for another reason is tried again this often, then left pending: the
# periodic claim (after the broker's claim_idle_ms) retries it, up to max_deliveries.
_ATTEMPTS = 3
_BACKOFF_S = 1.0
_MAX_RETRY_AFTER_S = 600.0


class RetryLater(Exception):
    """The platform said "too many requests": nothing was sent; try again after a pause."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class Undeliverable(Exception):
    """It can never be delivered (the chat is gone, the bot was blocked): ack and move on."""


class NotAllowed(Undeliverable):
    """The bot may not post in the chat: ``place`` (as the platform writes it, for the person
    to read) and what it lacks there, as the platform names it (``missing``). The chat core
    then posts to the person one to one, else says why on the job's status."""

    def __init__(self, place: str, missing: list[str]) -> None:
        super().__init__(f"no permission to post in {place} ({', '.join(missing)})")
        self.place = place
        self.missing = missing


class NotSent(Exception):
    """The platform answered that it refused a message (a bad request, a server error): it is
    surely not in the chat. Retried like any failure, without doubt about what is out."""


class DeliveryLoop:
    """Consumes ``atelier:deliveries:{frontend}`` in the front end's own consumer group.

    ``startup_claim_idle_ms`` (default 0) takes over every entry left pending when the loop
    starts: a restarted bot delivers what its previous run had read but not acked. Where
    several replicas share one stream, give it the broker's claim_idle_ms instead.
    """

    def __init__(
        self,
        broker: Broker,
        frontend: str,
        consumer: str,
        handler: Handler,
        state: BotState,
        *,
        concurrency: int = 8,
        block_ms: int = DEFAULT_BLOCK_MS,
        claim_every_s: float = DEFAULT_CLAIM_EVERY_S,
        startup_claim_idle_ms: int = 0,
        mark_delivered: MarkDelivered | None = None,
    ) -> None:
        self.broker = broker
        self.mark_delivered = mark_delivered
        self.frontend = frontend
        self.consumer = consumer
        self.handler = handler
        self.state = state
        self.block_ms = block_ms
        self.claim_every_s = claim_every_s
        self.startup_claim_idle_ms = startup_claim_idle_ms
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()  # set by stop(): ends retry pauses early
        self._job_locks: dict[str, tuple[asyncio.Lock, int]] = {}  # job -> (lock, users)

    def start(self) -> None:
        self._stopping = False
        self._wake = asyncio.Event()
        if self._task is None or self._task.done():
            # Supervised: a loop that ends unexpectedly is logged and started again.
            self._task = asyncio.create_task(
                supervise(f"{self.frontend} deliveries", self._run, self._wake),
                name=f"deliveries:{self.frontend}",
            )

    def stop_reading(self) -> None:
        """Take no more entries; retry pauses end now (``stop`` then waits for the rest)."""
        self._stopping = True
        self._wake.set()

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop reading, then let deliveries under way finish for up to ``grace_s``: one cut
        off after its upload would be posted again by the next start. Those waiting for a
        retry give up at once and stay pending (the next start delivers them)."""
        self.stop_reading()
        await cancel_and_wait([self._task] if self._task is not None else [])
        self._task = None
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace_s)
        await cancel_and_wait(list(self._inflight))

    async def _run(self) -> None:
        await self._claim(self.startup_claim_idle_ms)
        last_claim = time.monotonic()
        while not self._stopping:
            try:
                entries = await self.broker.deliveries.read_deliveries(
                    self.frontend, self.consumer, count=10, block_ms=self.block_ms
                )
            except BrokerUnavailable as exc:
                log.warning("deliveries: broker unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            except Exception:
                log.exception("deliveries: reading the stream failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for entry in entries:
                await self._spawn(entry)
            if time.monotonic() - last_claim >= self.claim_every_s:
                await self._claim(None)
                last_claim = time.monotonic()

    async def _claim(self, min_idle_ms: int | None) -> None:
        try:
            entries = await self.broker.deliveries.claim_stale_deliveries(
                self.frontend, self.consumer, min_idle_ms=min_idle_ms, count=50
            )
        except BrokerUnavailable as exc:
            log.warning("deliveries: could not claim stale entries (%s)", exc)
            return
        if entries:
            log.info("deliveries: took over %d unacknowledged entries", len(entries))
        for entry in entries:
            await self._spawn(entry)

    async def _spawn(self, entry: DeliveryEntry) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._deliver(entry), name=f"deliver:{entry.entry_id}")
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _deliver(self, entry: DeliveryEntry) -> None:
        try:
            event = JobEvent.from_fields(entry.event)
        except AtelierError as exc:
            log.warning("deliveries: dropping entry %s: %s", entry.entry_id, exc)
            await self._ack(entry)
            return
        # Two entries of one job (a republished event) are handled one after the other, so
        # the second sees the first's marker.
        lock, users = self._job_locks.get(event.job_id, (asyncio.Lock(), 0))
        self._job_locks[event.job_id] = (lock, users + 1)
        try:
            async with lock:
                await self._deliver_once(entry, event)
        finally:
            lock, users = self._job_locks.pop(event.job_id)
            if users > 1:
                self._job_locks[event.job_id] = (lock, users - 1)

    async def _deliver_once(self, entry: DeliveryEntry, event: JobEvent) -> None:
        marker = DELIVERED.format(platform=self.frontend, job=event.job_id)
        if not event.terminal:
            await self._ack(entry)  # a tick on the wrong stream
            return
        if await self.state.get(marker) is not None:
            # A repeat (a re-announcement, or a retry after a lost mark): mark, then ack.
            await self._mark(event.job_id)
            await self._ack(entry)
            return
        if self.broker.deliveries.over_delivered(entry):
            log.error(
                "deliveries: job %s failed delivery %d times; giving up",
                event.job_id,
                entry.deliveries,
            )
            await self._mark(event.job_id)  # given up on: not to be announced again
            await self._ack(entry)
            return
        if not await self._handle(event):
            return  # left pending: a later claim retries it
        await self.state.set(marker, entry.entry_id, DELIVERED_TTL_S)
        await self._mark(event.job_id)
        await self._ack(entry)

    async def _mark(self, job_id: str) -> None:
        """Record the delivery in the store. A failure (database down) is logged and the entry
        acked anyway: the job is re-announced later, the marker stops a second send, and the
        repeat marks it then."""
        if self.mark_delivered is None:
            return
        try:
            await self.mark_delivered(job_id)
        except AtelierError as exc:  # NotFound / Conflict: nothing to record
            log.warning("deliveries: job %s not marked delivered: %s", job_id, exc)
        except Exception:
            log.warning(
                "deliveries: job %s not marked delivered; it will be announced again",
                job_id,
                exc_info=True,
            )

    async def _handle(self, event: JobEvent) -> bool:
        failures = 0
        while True:
            try:
                await self.handler(event)
                return True
            except RetryLater as exc:
                # Not a failure: the platform asked us to wait. Nothing is acked meanwhile.
                wait = min(max(exc.retry_after, 0.1), _MAX_RETRY_AFTER_S)
                log.info("deliveries: job %s rate limited; retrying in %.1f s", event.job_id, wait)
            except Undeliverable as exc:
                log.warning("deliveries: job %s cannot be delivered: %s", event.job_id, exc)
                return True
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stopping:
                    log.info("deliveries: job %s left for the next start", event.job_id)
                    return False
                failures += 1
                if failures >= _ATTEMPTS:
                    log.exception("deliveries: job %s failed; leaving it pending", event.job_id)
                    return False
                log.warning("deliveries: job %s failed; retrying", event.job_id, exc_info=True)
                wait = _BACKOFF_S * failures
            if not await self._pause(wait):
                return False  # stopping: left pending

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False at once when the loop is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        return not self._stopping

    async def _ack(self, entry: DeliveryEntry) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.deliveries.ack_delivery(self.frontend, entry.entry_id)


async def cancel_and_wait(tasks: list[asyncio.Task[None]], timeout_s: float = 10.0) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again while they run on: redis-py
    (8.1) can swallow a cancellation that arrives while it sets up a connection."""
    deadline = time.monotonic() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task %s had failed: %r", task.get_name(), task.exception())
    if pending:
        log.warning("%d tasks did not stop within %.0f s", len(pending), timeout_s)
