"""The in-process twin of the Redis broker, for one box without Redis: same semantics, no I/O,
one class per concern over one shared open/closed state.

Safe for many tasks on one event loop (nothing awaits while state is half-changed); not shared
between processes, and its state is gone when the process ends.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from cluster import keys
from cluster.broker import (
    DEFAULT_CLAIM_IDLE_MS,
    DEFAULT_MAX_DELIVERIES,
    Broker,
    BrokerUnavailable,
    Deliveries,
    DeliveryEntry,
    Flags,
    JobEntry,
    JobQueue,
    Progress,
    Registry,
    StreamId,
    dead_letter_fields,
    event_fields,
    format_id,
    job_entry_fields,
    next_id,
    parse_id,
)

log = logging.getLogger(__name__)

# A subscriber this far behind loses ticks, as a slow pub/sub client would.
_PROGRESS_BACKLOG = 1000
_CLOSED = object()


def _new_id(last: StreamId) -> StreamId:
    """The next entry id, as XADD makes it: the time in ms, then a sequence within that ms."""
    ms = int(time.time() * 1000)
    return (ms, 0) if ms > last[0] else next_id(last)


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class _Group:
    last_delivered: StreamId = (0, 0)
    pel: dict[StreamId, _Pending] = field(default_factory=dict)


class _Stream:
    """An append-only log with ids like Redis's (``ms-seq``) and its consumer groups."""

    def __init__(self) -> None:
        self.ids: list[StreamId] = []
        self.data: dict[StreamId, dict[str, str]] = {}
        self.last_id: StreamId = (0, 0)
        self.groups: dict[str, _Group] = {}
        self.added = asyncio.Event()

    def add(self, fields: dict[str, str]) -> str:
        sid = self.last_id = _new_id(self.last_id)
        self.ids.append(sid)
        self.data[sid] = fields
        # Wake every blocked reader, then give later ones a fresh event to wait on.
        self.added.set()
        self.added = asyncio.Event()
        return format_id(sid)

    def group(self, name: str) -> _Group:
        # Created on first use from id "0", like the Redis broker's groups.
        return self.groups.setdefault(name, _Group())

    def undelivered(self, group: _Group) -> int:
        return len(self.ids) - bisect.bisect_right(self.ids, group.last_delivered)

    def deliver_new(self, name: str, consumer: str, count: int) -> list[tuple[str, dict[str, str]]]:
        group = self.group(name)
        start = bisect.bisect_right(self.ids, group.last_delivered)
        now = time.monotonic()
        out = []
        for sid in self.ids[start : start + count]:
            group.pel[sid] = _Pending(consumer, now, 1)
            group.last_delivered = sid
            out.append((format_id(sid), dict(self.data[sid])))
        return out

    def claim(
        self, name: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[tuple[str, dict[str, str], int]]:
        group = self.groups.get(name)
        if group is None:
            return []
        now = time.monotonic()
        out = []
        for sid in sorted(group.pel):
            pending = group.pel[sid]
            if (now - pending.delivered_at) * 1000 < min_idle_ms:
                continue
            if sid not in self.data:
                # Deleted while pending: nobody can process it, so it leaves the PEL.
                del group.pel[sid]
                continue
            pending.consumer, pending.delivered_at = consumer, now
            pending.deliveries += 1
            out.append((format_id(sid), dict(self.data[sid]), pending.deliveries))
            if len(out) >= count:
                break
        return out

    def ack(self, name: str, entry_id: str) -> bool:
        group = self.groups.get(name)
        return group is not None and group.pel.pop(parse_id(entry_id), None) is not None

    def trim(self) -> int:
        if not self.groups:
            return 0
        bound = min(
            min(group.pel) if group.pel else next_id(group.last_delivered)
            for group in self.groups.values()
        )
        cut = bisect.bisect_left(self.ids, bound)
        for sid in self.ids[:cut]:
            del self.data[sid]
        del self.ids[:cut]
        return cut


class _Core:
    """What the parts of one in-process broker share: whether it is open."""

    def __init__(self) -> None:
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise BrokerUnavailable("the in-process broker is closed")

    async def read(
        self, stream: _Stream, group: str, consumer: str, count: int, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        keys.check_consumer(consumer)
        self.check_open()
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            got = stream.deliver_new(group, consumer, count)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            try:
                await asyncio.wait_for(stream.added.wait(), remaining)
            except TimeoutError:
                return []
            self.check_open()


class MemoryJobQueue(JobQueue):
    """The jobs stream and its dead letters, in this process."""

    def __init__(self, core: _Core, *, claim_idle_ms: int, max_deliveries: int) -> None:
        super().__init__(claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)
        self._core = core
        self._jobs = _Stream()
        self._dead: deque[tuple[str, dict[str, str]]] = deque(maxlen=keys.DEAD_LETTER_MAXLEN)
        self._dead_last_id: StreamId = (0, 0)

    async def enqueue(self, job_id: str, fields: Mapping[str, str] | None = None) -> str:
        data = job_entry_fields(job_id, fields)
        self._core.check_open()
        return self._jobs.add(data)

    async def read_jobs(self, consumer: str, count: int = 1, block_ms: int = 0) -> list[JobEntry]:
        got = await self._core.read(self._jobs, keys.DISPATCHER_GROUP, consumer, count, block_ms)
        return [_job(eid, fields, 1) for eid, fields in got]

    async def claim_stale_jobs(
        self, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[JobEntry]:
        keys.check_consumer(consumer)
        self._core.check_open()
        idle = self.claim_idle_ms if min_idle_ms is None else min_idle_ms
        got = self._jobs.claim(keys.DISPATCHER_GROUP, consumer, idle, count)
        return [_job(eid, fields, n) for eid, fields, n in got]

    async def own_pending_jobs(self, consumer: str, count: int = 100) -> list[JobEntry]:
        keys.check_consumer(consumer)
        self._core.check_open()
        group = self._jobs.groups.get(keys.DISPATCHER_GROUP)
        if group is None:
            return []
        out: list[JobEntry] = []
        for sid in sorted(group.pel):
            pending = group.pel[sid]
            if pending.consumer != consumer:
                continue
            if sid not in self._jobs.data:
                del group.pel[sid]  # deleted while pending: nobody can process it
                continue
            out.append(_job(format_id(sid), dict(self._jobs.data[sid]), pending.deliveries))
            if len(out) >= count:
                break
        return out

    async def touch_jobs(self, consumer: str, entry_ids: Sequence[str]) -> None:
        keys.check_consumer(consumer)
        self._core.check_open()
        group = self._jobs.groups.get(keys.DISPATCHER_GROUP)
        if group is None:
            return
        now = time.monotonic()
        for entry_id in entry_ids:
            pending = group.pel.get(parse_id(entry_id))
            if pending is not None:
                pending.consumer, pending.delivered_at = consumer, now

    async def ack_job(self, entry_id: str) -> bool:
        self._core.check_open()
        return self._jobs.ack(keys.DISPATCHER_GROUP, entry_id)

    async def dead_letter(self, entry: JobEntry, reason: str) -> None:
        self._core.check_open()
        self._dead_last_id = _new_id(self._dead_last_id)
        self._dead.append((format_id(self._dead_last_id), dead_letter_fields(entry, reason)))
        self._jobs.ack(keys.DISPATCHER_GROUP, entry.entry_id)
        log.warning(
            "dead-lettered job %s after %d deliveries: %s", entry.job_id, entry.deliveries, reason
        )

    async def queue_depth(self) -> int:
        self._core.check_open()
        group = self._jobs.groups.get(keys.DISPATCHER_GROUP)
        return len(self._jobs.ids) if group is None else self._jobs.undelivered(group)

    async def pending_count(self) -> int:
        self._core.check_open()
        group = self._jobs.groups.get(keys.DISPATCHER_GROUP)
        return 0 if group is None else len(group.pel)

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        self._core.check_open()
        newest = list(self._dead)[::-1][:count]
        return [{"id": eid, **fields} for eid, fields in newest]

    async def trim(self) -> int:
        self._core.check_open()
        return self._jobs.trim()

    def wake(self) -> None:
        """Wake blocked readers so they notice the broker closed."""
        self._jobs.added.set()


class MemoryDeliveries(Deliveries):
    """One stream per front end, in this process."""

    def __init__(self, core: _Core, *, claim_idle_ms: int, max_deliveries: int) -> None:
        super().__init__(claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)
        self._core = core
        self._deliveries: dict[str, _Stream] = {}

    def _delivery_stream(self, frontend: str) -> _Stream:
        return self._deliveries.setdefault(keys.deliveries_stream(frontend), _Stream())

    async def publish_delivery(self, frontend: str, event: Mapping[str, str]) -> str:
        stream = self._delivery_stream(frontend)
        data = event_fields(event)
        self._core.check_open()
        return stream.add(data)

    async def read_deliveries(
        self, frontend: str, consumer: str, count: int = 10, block_ms: int = 0
    ) -> list[DeliveryEntry]:
        stream = self._delivery_stream(frontend)
        group = keys.delivery_group(frontend)
        got = await self._core.read(stream, group, consumer, count, block_ms)
        return [DeliveryEntry(eid, frontend, fields, 1) for eid, fields in got]

    async def claim_stale_deliveries(
        self, frontend: str, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[DeliveryEntry]:
        stream = self._delivery_stream(frontend)
        keys.check_consumer(consumer)
        self._core.check_open()
        idle = self.claim_idle_ms if min_idle_ms is None else min_idle_ms
        got = stream.claim(keys.delivery_group(frontend), consumer, idle, count)
        return [DeliveryEntry(eid, frontend, fields, n) for eid, fields, n in got]

    async def ack_delivery(self, frontend: str, entry_id: str) -> bool:
        stream = self._delivery_stream(frontend)
        self._core.check_open()
        return stream.ack(keys.delivery_group(frontend), entry_id)

    async def trim(self) -> int:
        self._core.check_open()
        return sum(s.trim() for s in self._deliveries.values())

    def wake(self) -> None:
        """Wake blocked readers so they notice the broker closed."""
        for stream in self._deliveries.values():
            stream.added.set()


class MemoryProgress(Progress):
    """Progress ticks to the subscribers in this process."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._subscribers: dict[str, set[asyncio.Queue[object]]] = {}

    async def publish(self, job_id: str, event: Mapping[str, Any]) -> None:
        channel = keys.progress_channel(job_id)
        # Through JSON, so that what a subscriber gets matches the Redis broker exactly.
        message = json.dumps(dict(event))
        self._core.check_open()
        for queue in self._subscribers.get(channel, ()):
            if queue.qsize() < _PROGRESS_BACKLOG:
                queue.put_nowait(message)

    @asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        channel = keys.progress_channel(job_id)
        self._core.check_open()
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._subscribers.setdefault(channel, set()).add(queue)
        try:
            yield _Subscription(queue)
        finally:
            subscribers = self._subscribers.get(channel)
            if subscribers is not None:
                subscribers.discard(queue)
                if not subscribers:
                    del self._subscribers[channel]

    def wake(self) -> None:
        """End every subscriber's iteration: the broker closed."""
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait(_CLOSED)


class MemoryFlags(Flags):
    """Cancel flags and re-announcement claims with monotonic expiries."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._cancels: dict[str, float] = {}  # job id -> monotonic expiry
        self._redeliveries: dict[str, float] = {}  # job id -> monotonic expiry of the claim

    async def request_cancel(self, job_id: str, ttl_s: float = keys.CANCEL_TTL_S) -> None:
        keys.cancel_key(job_id)
        self._core.check_open()
        now = _drop_expired(self._cancels)
        self._cancels[job_id] = now + max(ttl_s, 0.001)

    async def is_cancel_requested(self, job_id: str) -> bool:
        keys.cancel_key(job_id)
        self._core.check_open()
        return self._cancels.get(job_id, 0.0) > time.monotonic()

    async def claim_redelivery(self, job_id: str, ttl_s: float) -> bool:
        keys.redeliver_key(job_id)
        self._core.check_open()
        now = _drop_expired(self._redeliveries)
        if job_id in self._redeliveries:
            return False
        self._redeliveries[job_id] = now + max(ttl_s, 0.001)
        return True


class MemoryRegistry(Registry):
    """Workers' models and dispatchers' demand with monotonic expiries."""

    def __init__(self, core: _Core) -> None:
        self._core = core
        self._worker_models: dict[str, frozenset[str]] = {}
        self._worker_models_until: dict[str, float] = {}  # worker id -> monotonic expiry
        self._demand: dict[str, dict[str, dict[str, float]]] = {}
        self._demand_until: dict[str, float] = {}  # dispatcher -> monotonic expiry

    async def publish_worker_models(
        self, worker_id: str, models: Sequence[str], ttl_s: float = keys.WORKER_MODELS_TTL_S
    ) -> None:
        keys.worker_models_key(worker_id)
        self._core.check_open()
        now = _drop_expired(self._worker_models_until)
        self._worker_models_until[worker_id] = now + max(ttl_s, 0.001)
        self._worker_models[worker_id] = frozenset(models)

    async def worker_models(self) -> dict[str, frozenset[str]]:
        self._core.check_open()
        _drop_expired(self._worker_models_until)
        for gone in self._worker_models.keys() - self._worker_models_until.keys():
            del self._worker_models[gone]
        return dict(self._worker_models)

    async def publish_demand(
        self, dispatcher: str, demand: Mapping[str, Mapping[str, float]], ttl_s: float
    ) -> None:
        keys.demand_key(dispatcher)
        self._core.check_open()
        now = _drop_expired(self._demand_until)
        self._demand_until[dispatcher] = now + max(ttl_s, 0.001)
        self._demand[dispatcher] = {c: {k: float(v) for k, v in d.items()}
                                    for c, d in demand.items()}

    async def withdraw_demand(self, dispatcher: str) -> None:
        keys.demand_key(dispatcher)
        self._core.check_open()
        self._demand.pop(dispatcher, None)
        self._demand_until.pop(dispatcher, None)

    async def demand(self) -> dict[str, dict[str, dict[str, float]]]:
        self._core.check_open()
        _drop_expired(self._demand_until)
        for gone in self._demand.keys() - self._demand_until.keys():
            del self._demand[gone]
        return {n: {c: dict(d) for c, d in v.items()} for n, v in self._demand.items()}


class MemoryBroker(Broker):
    """The broker's parts inside this process: pending lists, delivery counts, claims, dead
    letters, subscribers, flags and lapsing records."""

    kind = "memory"

    def __init__(
        self,
        *,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ) -> None:
        self._epoch = uuid.uuid4().hex
        self._core = _Core()
        limits = {"claim_idle_ms": claim_idle_ms, "max_deliveries": max_deliveries}
        self.jobs = self._jobs = MemoryJobQueue(self._core, **limits)
        self.deliveries = self._deliveries = MemoryDeliveries(self._core, **limits)
        self.progress = self._progress = MemoryProgress(self._core)
        self.flags = MemoryFlags(self._core)
        self.registry = MemoryRegistry(self._core)

    async def server_epoch(self) -> str:
        self._core.check_open()
        return self._epoch

    async def ping(self, timeout_s: float = 1.0) -> bool:
        return not self._core.closed

    async def close(self) -> None:
        if self._core.closed:
            return
        self._core.closed = True
        # Wake blocked readers and subscribers so they notice.
        self._jobs.wake()
        self._deliveries.wake()
        self._progress.wake()


def _job(entry_id: str, fields: dict[str, str], deliveries: int) -> JobEntry:
    job_id = fields.pop("job_id")
    return JobEntry(entry_id=entry_id, job_id=job_id, fields=fields, deliveries=deliveries)


class _Subscription:
    def __init__(self, queue: asyncio.Queue[object]) -> None:
        self._queue = queue

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            message = await self._queue.get()
            if message is _CLOSED:
                raise BrokerUnavailable("the in-process broker is closed")
            event = json.loads(str(message))
            if isinstance(event, dict):
                return event


def _drop_expired(expiries: dict[str, float]) -> float:
    """Drop the entries whose monotonic expiry has passed (so a dict of TTL'd flags never
    outgrows the last TTL's worth of jobs); returns now."""
    now = time.monotonic()
    for expired in [k for k, until in expiries.items() if until <= now]:
        del expiries[expired]
    return now
