"""The broker between front ends, dispatchers and workers, split by concern: the job queue,
deliveries to front ends, progress ticks, per-job flags and the lapsing registry of workers'
models and dispatchers' demand (one protocol each), bundled over one connection as ``Broker``.

Implementations: ``cluster.broker_redis.RedisBroker`` (Redis Streams) and
``cluster.broker_memory.MemoryBroker`` (its in-process twin for the single-box default).
The web's rate-limit counter is not the broker's: ``web.ratelimit``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar

from cluster import keys
from core.errors import AtelierError

# A job's entry left un-acked this long is taken over by another dispatcher. A dispatcher working
# on something longer keeps its entries fresh with touch_jobs().
DEFAULT_CLAIM_IDLE_MS = 60_000
DEFAULT_MAX_DELIVERIES = 5
MAX_REASON_CHARS = 2000

StreamId = tuple[int, int]


class BrokerUnavailable(AtelierError):
    """The broker cannot be reached (Redis down, restarting, or the broker was closed)."""

    code = "broker_unavailable"


@dataclass(frozen=True, slots=True)
class JobEntry:
    """One delivery of a job from the jobs stream; ``deliveries`` counts this one too."""

    entry_id: str
    job_id: str
    fields: dict[str, str] = field(default_factory=dict)
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class DeliveryEntry:
    """One delivery of a finished-job event to a front end."""

    entry_id: str
    frontend: str
    event: dict[str, str]
    deliveries: int = 1


class _Streams(ABC):
    """What the two stream concerns share: at-least-once reads with claims and a delivery cap.

    Every read is at-least-once: an entry stays pending for its group until acked, and after
    ``claim_idle_ms`` without an ack another consumer may claim it (its delivery count grows).
    ``block_ms <= 0`` means "do not block" (unlike Redis, where BLOCK 0 waits forever).
    """

    def __init__(self, *, claim_idle_ms: int, max_deliveries: int) -> None:
        if claim_idle_ms < 1:
            raise ValueError(f"claim_idle_ms must be at least 1, got {claim_idle_ms}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, got {max_deliveries}")
        self._claim_idle_ms = claim_idle_ms
        self._max_deliveries = max_deliveries

    @property
    def claim_idle_ms(self) -> int:
        return self._claim_idle_ms

    @property
    def max_deliveries(self) -> int:
        return self._max_deliveries

    def over_delivered(self, entry: JobEntry | DeliveryEntry) -> bool:
        """True once an entry was handed out more than ``max_deliveries`` times: give up on it."""
        return entry.deliveries > self._max_deliveries

    @abstractmethod
    async def trim(self) -> int:
        """Drop acked entries from this concern's streams; returns how many went.

        Never drops an entry that is pending or not yet delivered in some group; a stream with
        no group yet is left alone.
        """


class JobQueue(_Streams):
    """The jobs stream the dispatchers read as one group, and its dead letters."""

    @abstractmethod
    async def enqueue(self, job_id: str, fields: Mapping[str, str] | None = None) -> str:
        """Add a job to the jobs stream; returns the entry id."""

    @abstractmethod
    async def read_jobs(self, consumer: str, count: int = 1, block_ms: int = 0) -> list[JobEntry]:
        """New jobs for ``consumer`` in the dispatchers group (created on first use)."""

    @abstractmethod
    async def claim_stale_jobs(
        self, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[JobEntry]:
        """Take over up to ``count`` jobs left un-acked for ``min_idle_ms`` (default claim_idle_ms).

        Pending entries whose stream entry is gone are acked away, not returned.
        """

    @abstractmethod
    async def own_pending_jobs(self, consumer: str, count: int = 100) -> list[JobEntry]:
        """Up to ``count`` entries delivered to ``consumer`` and not acked, oldest first: what a
        dispatcher of that name held when its process stopped. They stay ``consumer``'s, and
        reading them neither counts a delivery nor resets their idle time. Pending entries
        whose stream entry is gone are acked away, not returned."""

    @abstractmethod
    async def touch_jobs(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of entries ``consumer`` still works on, without counting a delivery.

        Call it well within ``claim_idle_ms`` during a long run so nobody else claims the job.
        """

    @abstractmethod
    async def ack_job(self, entry_id: str) -> bool:
        """Mark a job entry done; False if it was not pending (already acked, or lost)."""

    @abstractmethod
    async def dead_letter(self, entry: JobEntry, reason: str) -> None:
        """Record the job on the dead-letter stream, then ack it.

        A crash between the two can only duplicate the dead letter; readers dedupe by job_id.
        """

    @abstractmethod
    async def queue_depth(self) -> int:
        """Jobs not yet delivered to any dispatcher."""

    @abstractmethod
    async def pending_count(self) -> int:
        """Jobs delivered to a dispatcher and not yet acked."""

    @abstractmethod
    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest ``count`` dead letters, newest first (``id`` is the dead-letter entry id)."""


class Deliveries(_Streams):
    """Finished-job events, one stream per front end, each read by that front end's group."""

    @abstractmethod
    async def publish_delivery(self, frontend: str, event: Mapping[str, str]) -> str:
        """Add an event to the front end's delivery stream; returns the entry id."""

    @abstractmethod
    async def read_deliveries(
        self, frontend: str, consumer: str, count: int = 10, block_ms: int = 0
    ) -> list[DeliveryEntry]:
        """New events for ``consumer`` in the front end's own group (created on first use)."""

    @abstractmethod
    async def claim_stale_deliveries(
        self, frontend: str, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[DeliveryEntry]:
        """Take over events another consumer of this front end left un-acked."""

    @abstractmethod
    async def ack_delivery(self, frontend: str, entry_id: str) -> bool:
        """Mark an event delivered; False if it was not pending."""


class Progress(ABC):
    """A job's progress ticks: best effort, to whoever listens now."""

    @abstractmethod
    async def publish(self, job_id: str, event: Mapping[str, Any]) -> None:
        """Send a JSON-serialisable event to whoever is subscribed now; nobody may be."""

    @abstractmethod
    def subscribe(
        self, job_id: str
    ) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
        """Subscribe to a job's progress: ``async with broker.progress.subscribe(j) as events:``.

        The subscription exists once the block is entered; iterating never ends by itself
        (leave the block to unsubscribe). Events published before entering are not seen.
        """


class Flags(ABC):
    """Short-lived per-job flags with a TTL: cancellation, and who re-announces a job."""

    @abstractmethod
    async def request_cancel(self, job_id: str, ttl_s: float = keys.CANCEL_TTL_S) -> None:
        """Flag a job as cancelled for ``ttl_s`` seconds."""

    @abstractmethod
    async def is_cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    async def claim_redelivery(self, job_id: str, ttl_s: float) -> bool:
        """True for the first caller in ``ttl_s`` seconds (a SET NX with a TTL): the
        dispatcher that may re-announce ``job_id`` this period, so several dispatchers
        re-announce an undelivered job once, not once each."""


class Registry(ABC):
    """Records that lapse unless refreshed: which models each worker can load, and each
    dispatcher's autoscaling demand."""

    @abstractmethod
    async def publish_worker_models(
        self, worker_id: str, models: Sequence[str], ttl_s: float = keys.WORKER_MODELS_TTL_S
    ) -> None:
        """Record for ``ttl_s`` seconds that worker ``worker_id`` can load ``models``
        (replacing what was published for it before)."""

    @abstractmethod
    async def worker_models(self) -> dict[str, frozenset[str]]:
        """What was published for each worker whose record has not lapsed, by worker id."""

    @abstractmethod
    async def publish_demand(
        self, dispatcher: str, demand: Mapping[str, Mapping[str, float]], ttl_s: float
    ) -> None:
        """Record for ``ttl_s`` seconds what ``dispatcher`` sees queued per device class
        (``{class: {"queued": n, "busy": n, "work_s": s}}``), replacing its earlier record."""

    @abstractmethod
    async def withdraw_demand(self, dispatcher: str) -> None:
        """Drop ``dispatcher``'s record (it stops)."""

    @abstractmethod
    async def demand(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every dispatcher's record that has not lapsed, by dispatcher name."""


class Broker(ABC):
    """The parts front ends, dispatchers and workers meet through, over one connection:
    ``jobs`` (JobQueue), ``deliveries`` (Deliveries), ``progress`` (Progress), ``flags``
    (Flags) and ``registry`` (Registry); callers reach each concern through its attribute."""

    kind: ClassVar[str]
    jobs: JobQueue
    deliveries: Deliveries
    progress: Progress
    flags: Flags
    registry: Registry

    async def trim(self) -> int:
        """Drop acked entries from the jobs and delivery streams; returns how many went."""
        return await self.jobs.trim() + await self.deliveries.trim()

    @abstractmethod
    async def server_epoch(self) -> str:
        """Changes whenever the broker's state was lost (a Redis restart): re-enqueue then."""

    @abstractmethod
    async def ping(self, timeout_s: float = 1.0) -> bool:
        """True if the broker answers within ``timeout_s``; never raises."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; later calls raise BrokerUnavailable. Idempotent."""

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# Helpers shared by the implementations -----------------------------------------------------


def job_entry_fields(job_id: str, fields: Mapping[str, str] | None) -> dict[str, str]:
    """The stream fields for a job: ``job_id`` plus the caller's string fields."""
    keys.check_job_id(job_id)
    out = {"job_id": job_id}
    for name, value in (fields or {}).items():
        if name == "job_id":
            raise ValueError("fields must not contain 'job_id'; pass it as job_id")
        out[name] = check_str_field(name, value)
    return out


def event_fields(event: Mapping[str, str]) -> dict[str, str]:
    if not event:
        raise ValueError("a delivery event needs at least one field")
    return {name: check_str_field(name, value) for name, value in event.items()}


def check_str_field(name: object, value: object) -> str:
    # Redis would silently turn ints into strings and the memory twin would not: refuse both.
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(f"stream fields must be str -> str, got {name!r}: {value!r}")
    return value


def dead_letter_fields(entry: JobEntry, reason: str) -> dict[str, str]:
    return {
        "job_id": entry.job_id,
        "reason": reason[:MAX_REASON_CHARS],
        "deliveries": str(entry.deliveries),
        "entry_id": entry.entry_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def parse_id(entry_id: str) -> StreamId:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def next_id(sid: StreamId) -> StreamId:
    """The smallest id after ``sid``."""
    if sid[1] >= 2**64 - 1:
        return sid[0] + 1, 0
    return sid[0], sid[1] + 1
