"""The broker on Redis (redis.asyncio), one class per concern over one shared connection:
Streams with consumer groups and XAUTOCLAIM (jobs, deliveries), pub/sub (progress), keys with
a TTL (flags, registry)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
    dead_letter_fields,
    event_fields,
    format_id,
    job_entry_fields,
    next_id,
    parse_id,
)
from core.errors import ConfigError
from core.redact import redact_url

log = logging.getLogger(__name__)

# Raw entries as redis-py returns them: (entry id, fields, times delivered).
_Raw = tuple[str, dict[str, str], int]

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
# Past this many undelivered entries queue_depth() stops counting by hand (only when Redis
# cannot give the group's lag itself).
_DEPTH_SCAN_LIMIT = 100_000


def _is_nogroup(exc: ResponseError) -> bool:
    # The stream or its group is missing: first use, or Redis restarted and lost both.
    return str(exc).startswith("NOGROUP")


class RedisConnection:
    """One redis.asyncio client shared by the broker's parts (and the web's rate counter):
    every way of not reaching Redis becomes one BrokerUnavailable naming the URL."""

    def __init__(self, url: str, *, socket_timeout_s: float = 10.0) -> None:
        self.safe_url = redact_url(url)
        # Blocking reads must return before the socket timeout would cut them off.
        self._max_block_ms = max(0, int(socket_timeout_s * 1000) - 1000)
        self.closed = False
        try:
            self.client: Any = aioredis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=min(socket_timeout_s, 2.0),
                health_check_interval=15,
                # A few quick retries ride out a restart; more would only stall callers.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
                client_name="atelier",
            )
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {self.safe_url}: {exc}") from None

    @asynccontextmanager
    async def errors(self, doing: str) -> AsyncIterator[None]:
        """Turn every way of not reaching Redis into one BrokerUnavailable naming the URL."""
        if self.closed:
            raise BrokerUnavailable(f"the broker for {self.safe_url} is closed")
        try:
            yield
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(
                f"Redis at {self.safe_url} is unavailable while {doing}: {exc}"
            ) from exc

    # Streams and groups -------------------------------------------------------------------

    def block(self, block_ms: int) -> int | None:
        if block_ms <= 0:
            return None
        return min(block_ms, self._max_block_ms) or None

    async def ensure_group(self, stream: str, group: str) -> None:
        # Id "0", not "$": entries added before the group existed (just after a restart, say)
        # are still delivered.
        try:
            await self.client.xgroup_create(stream, group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", group, stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[_Raw]:
        keys.check_consumer(consumer)
        for attempt in range(2):
            try:
                reply = await self.client.xreadgroup(
                    group, consumer, {stream: ">"}, count=count, block=self.block(block_ms)
                )
                break
            except ResponseError as exc:
                if attempt or not _is_nogroup(exc):
                    raise
                await self.ensure_group(stream, group)
        if not reply:
            return []
        # RESP2 gives [[stream, entries]], RESP3 {stream: [entries]}.
        if isinstance(reply, dict):
            batches = [
                entries[0] if entries and isinstance(entries[0], list) else entries
                for entries in reply.values()
            ]
        else:
            batches = [entries for _, entries in reply]
        return [(eid, fields, 1) for entries in batches for eid, fields in entries if fields]

    async def claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[_Raw]:
        keys.check_consumer(consumer)
        idle = min_idle_ms
        claimed: list[tuple[str, dict[str, str]]] = []
        gone: list[str] = []
        cursor = "0-0"
        # XAUTOCLAIM scans at most 10 x count PEL entries per call: follow the cursor so stale
        # entries behind many fresh ones are still found.
        while len(claimed) < count:
            try:
                reply = await self.client.xautoclaim(
                    stream, group, consumer, idle, start_id=cursor, count=count - len(claimed)
                )
            except ResponseError as exc:
                if _is_nogroup(exc):
                    return []  # no group yet (or Redis restarted): nothing is pending
                raise
            cursor = reply[0]
            for eid, fields in reply[1]:
                # Redis 6.2 returns entries deleted from the stream as nil fields, 7.0 in a
                # third element; either way they can never be processed.
                if fields:
                    claimed.append((eid, fields))
                elif eid:
                    gone.append(eid)
            if len(reply) > 2:
                gone.extend(reply[2])
            if cursor in ("0-0", "0"):
                break
        if gone:
            log.warning(
                "acking %d entries of %s deleted while pending: %s", len(gone), stream, gone[:10]
            )
            await self.client.xack(stream, group, *gone)
        if not claimed:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for eid, _ in claimed:
                pipe.xpending_range(stream, group, min=eid, max=eid, count=1)
            infos = await pipe.execute()
        out: list[_Raw] = []
        for (eid, fields), info in zip(claimed, infos, strict=True):
            # Gone from the PEL in the meantime (acked by its old owner): it is done.
            if info:
                out.append((eid, fields, int(info[0]["times_delivered"])))
        return out

    async def group_info(self, stream: str) -> list[dict[str, Any]]:
        try:
            return list(await self.client.xinfo_groups(stream))
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return []
            raise

    async def trim_stream(self, stream: str) -> int:
        groups = await self.group_info(stream)
        if not groups:
            return 0  # nobody has read it yet: everything in it is undelivered
        bounds = []
        for group in groups:
            if group["pending"]:
                summary = await self.client.xpending(stream, group["name"])
                bounds.append(parse_id(summary["min"]))
            else:
                bounds.append(next_id(parse_id(group["last-delivered-id"])))
        # Racing consumers only ack (moving the oldest pending later) or read entries newer
        # than last-delivered-id, so a bound computed a moment ago is still safe.
        return int(await self.client.xtrim(stream, minid=format_id(min(bounds)), approximate=False))

    async def ping(self, timeout_s: float = 1.0) -> bool:
        if self.closed:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with suppress(RedisError, OSError):
            await self.client.aclose()


class RedisJobQueue(JobQueue):
    """The jobs stream and its dead letters on Redis Streams."""

    def __init__(
        self, conn: RedisConnection, *, claim_idle_ms: int, max_deliveries: int
    ) -> None:
        super().__init__(claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)
        self._conn = conn

    def _idle(self, min_idle_ms: int | None) -> int:
        return self.claim_idle_ms if min_idle_ms is None else min_idle_ms

    def _job(self, raw: _Raw) -> JobEntry | None:
        eid, fields, deliveries = raw
        fields = dict(fields)
        job_id = fields.pop("job_id", None)
        if job_id is None:
            return None
        return JobEntry(entry_id=eid, job_id=job_id, fields=fields, deliveries=deliveries)

    async def _jobs(self, raws: list[_Raw]) -> list[JobEntry]:
        jobs = []
        for raw in raws:
            job = self._job(raw)
            if job is None:
                # Someone else's XADD: no consumer could ever handle it, so park it once.
                log.warning("jobs entry %s has no job_id; dead-lettering it", raw[0])
                await self.dead_letter(JobEntry(raw[0], "", raw[1], raw[2]), "no job_id field")
            else:
                jobs.append(job)
        return jobs

    async def enqueue(self, job_id: str, fields: Mapping[str, str] | None = None) -> str:
        data = job_entry_fields(job_id, fields)
        async with self._conn.errors("enqueueing a job"):
            return str(await self._conn.client.xadd(keys.JOBS_STREAM, data))

    async def read_jobs(self, consumer: str, count: int = 1, block_ms: int = 0) -> list[JobEntry]:
        async with self._conn.errors("reading jobs"):
            raws = await self._conn.read(
                keys.JOBS_STREAM, keys.DISPATCHER_GROUP, consumer, count, block_ms
            )
            return await self._jobs(raws)

    async def claim_stale_jobs(
        self, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[JobEntry]:
        async with self._conn.errors("claiming stale jobs"):
            raws = await self._conn.claim(
                keys.JOBS_STREAM, keys.DISPATCHER_GROUP, consumer, self._idle(min_idle_ms), count
            )
            return await self._jobs(raws)

    async def own_pending_jobs(self, consumer: str, count: int = 100) -> list[JobEntry]:
        keys.check_consumer(consumer)
        stream, group = keys.JOBS_STREAM, keys.DISPATCHER_GROUP
        async with self._conn.errors("reading own pending jobs"):
            try:
                pending = await self._conn.client.xpending_range(
                    stream, group, min="-", max="+", count=count, consumername=consumer
                )
            except ResponseError as exc:
                if _is_nogroup(exc):
                    return []  # no group yet (or Redis restarted): nothing is pending
                raise
            if not pending:
                return []
            async with self._conn.client.pipeline(transaction=False) as pipe:
                for p in pending:
                    pipe.xrange(stream, min=p["message_id"], max=p["message_id"], count=1)
                found = await pipe.execute()
            out: list[JobEntry] = []
            gone: list[str] = []
            for p, rows in zip(pending, found, strict=True):
                eid = str(p["message_id"])
                if not rows or not rows[0][1]:
                    gone.append(eid)
                    continue
                raw: _Raw = (eid, rows[0][1], int(p["times_delivered"]))
                out.extend(await self._jobs([raw]))
            if gone:
                log.warning("acking %d own entries deleted while pending: %s", len(gone),
                            gone[:10])
                await self._conn.client.xack(stream, group, *gone)
            return out

    async def touch_jobs(self, consumer: str, entry_ids: Sequence[str]) -> None:
        keys.check_consumer(consumer)
        if not entry_ids:
            return
        async with self._conn.errors("touching jobs"):
            try:
                # JUSTID: resets the idle time without counting another delivery.
                await self._conn.client.xclaim(
                    keys.JOBS_STREAM,
                    keys.DISPATCHER_GROUP,
                    consumer,
                    0,
                    list(entry_ids),
                    justid=True,
                )
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise

    async def ack_job(self, entry_id: str) -> bool:
        async with self._conn.errors("acking a job"):
            return bool(
                await self._conn.client.xack(keys.JOBS_STREAM, keys.DISPATCHER_GROUP, entry_id)
            )

    async def dead_letter(self, entry: JobEntry, reason: str) -> None:
        # MULTI/EXEC keeps the two together; XADD first so that a lost reply and a retry can
        # only duplicate the dead letter.
        async with (
            self._conn.errors("dead-lettering a job"),
            self._conn.client.pipeline(transaction=True) as pipe,
        ):
            pipe.xadd(
                keys.DEAD_LETTER_STREAM,
                dead_letter_fields(entry, reason),
                maxlen=keys.DEAD_LETTER_MAXLEN,
                approximate=True,
            )
            pipe.xack(keys.JOBS_STREAM, keys.DISPATCHER_GROUP, entry.entry_id)
            await pipe.execute()
        log.warning(
            "dead-lettered job %s after %d deliveries: %s", entry.job_id, entry.deliveries, reason
        )

    async def queue_depth(self) -> int:
        async with self._conn.errors("reading the queue depth"):
            groups = await self._conn.group_info(keys.JOBS_STREAM)
            group = next((g for g in groups if g["name"] == keys.DISPATCHER_GROUP), None)
            if group is None:
                return int(await self._conn.client.xlen(keys.JOBS_STREAM))
            if group.get("lag") is not None:
                return int(group["lag"])
            # Lag is unknown after deletions in the undelivered range (or before Redis 7):
            # count what lies after the last delivered id. (XLEN - entries-read would go wrong
            # once trim() has removed entries.)
            after = await self._conn.client.xrange(
                keys.JOBS_STREAM,
                min="(" + group["last-delivered-id"],
                max="+",
                count=_DEPTH_SCAN_LIMIT,
            )
            return len(after)

    async def pending_count(self) -> int:
        async with self._conn.errors("reading the pending count"):
            try:
                summary = await self._conn.client.xpending(keys.JOBS_STREAM, keys.DISPATCHER_GROUP)
            except ResponseError as exc:
                if _is_nogroup(exc):
                    return 0
                raise
            return int(summary["pending"])

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        async with self._conn.errors("reading dead letters"):
            entries = await self._conn.client.xrevrange(keys.DEAD_LETTER_STREAM, count=count)
        return [{"id": eid, **fields} for eid, fields in entries]

    async def trim(self) -> int:
        async with self._conn.errors("trimming the jobs stream"):
            trimmed = await self._conn.trim_stream(keys.JOBS_STREAM)
        if trimmed:
            log.debug("trimmed %d acked job entries", trimmed)
        return trimmed


class RedisDeliveries(Deliveries):
    """One Redis stream per front end, read by that front end's group."""

    def __init__(
        self, conn: RedisConnection, *, claim_idle_ms: int, max_deliveries: int
    ) -> None:
        super().__init__(claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries)
        self._conn = conn

    def _idle(self, min_idle_ms: int | None) -> int:
        return self.claim_idle_ms if min_idle_ms is None else min_idle_ms

    async def publish_delivery(self, frontend: str, event: Mapping[str, str]) -> str:
        stream = keys.deliveries_stream(frontend)
        data = event_fields(event)
        async with self._conn.errors("publishing a delivery"):
            return str(await self._conn.client.xadd(stream, data))

    async def read_deliveries(
        self, frontend: str, consumer: str, count: int = 10, block_ms: int = 0
    ) -> list[DeliveryEntry]:
        stream, group = keys.deliveries_stream(frontend), keys.delivery_group(frontend)
        async with self._conn.errors("reading deliveries"):
            raws = await self._conn.read(stream, group, consumer, count, block_ms)
        return [DeliveryEntry(eid, frontend, fields, n) for eid, fields, n in raws]

    async def claim_stale_deliveries(
        self, frontend: str, consumer: str, min_idle_ms: int | None = None, count: int = 10
    ) -> list[DeliveryEntry]:
        stream, group = keys.deliveries_stream(frontend), keys.delivery_group(frontend)
        async with self._conn.errors("claiming stale deliveries"):
            raws = await self._conn.claim(stream, group, consumer, self._idle(min_idle_ms), count)
        return [DeliveryEntry(eid, frontend, fields, n) for eid, fields, n in raws]

    async def ack_delivery(self, frontend: str, entry_id: str) -> bool:
        stream, group = keys.deliveries_stream(frontend), keys.delivery_group(frontend)
        async with self._conn.errors("acking a delivery"):
            return bool(await self._conn.client.xack(stream, group, entry_id))

    async def trim(self) -> int:
        async with self._conn.errors("trimming the delivery streams"):
            trimmed = 0
            async for key in self._conn.client.scan_iter(
                match=keys.DELIVERIES_PREFIX + "*", _type="STREAM"
            ):
                trimmed += await self._conn.trim_stream(key)
        if trimmed:
            log.debug("trimmed %d acked delivery entries", trimmed)
        return trimmed


class RedisProgress(Progress):
    """Progress ticks on pub/sub channels."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def publish(self, job_id: str, event: Mapping[str, Any]) -> None:
        channel = keys.progress_channel(job_id)
        message = json.dumps(dict(event))
        async with self._conn.errors("publishing progress"):
            await self._conn.client.publish(channel, message)

    @asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        channel = keys.progress_channel(job_id)
        async with self._conn.errors("subscribing to progress"):
            pubsub = self._conn.client.pubsub(ignore_subscribe_messages=True)
        try:
            async with self._conn.errors("subscribing to progress"):
                await pubsub.subscribe(channel)
            yield _Subscription(self._conn, pubsub)
        finally:
            with suppress(RedisError, OSError):
                await pubsub.unsubscribe()
            with suppress(RedisError, OSError):
                await pubsub.aclose()


class RedisFlags(Flags):
    """Cancel flags and re-announcement claims: keys with a TTL."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def request_cancel(self, job_id: str, ttl_s: float = keys.CANCEL_TTL_S) -> None:
        key = keys.cancel_key(job_id)
        async with self._conn.errors("requesting a cancel"):
            await self._conn.client.set(key, "1", px=max(1, int(ttl_s * 1000)))

    async def is_cancel_requested(self, job_id: str) -> bool:
        key = keys.cancel_key(job_id)
        async with self._conn.errors("checking a cancel"):
            return bool(await self._conn.client.exists(key))

    async def claim_redelivery(self, job_id: str, ttl_s: float) -> bool:
        key = keys.redeliver_key(job_id)
        async with self._conn.errors("claiming a re-announcement"):
            px = max(1, int(ttl_s * 1000))
            return bool(await self._conn.client.set(key, "1", px=px, nx=True))


class RedisRegistry(Registry):
    """Workers' models and dispatchers' demand: JSON values under keys with a TTL."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def publish_worker_models(
        self, worker_id: str, models: Sequence[str], ttl_s: float = keys.WORKER_MODELS_TTL_S
    ) -> None:
        key = keys.worker_models_key(worker_id)
        async with self._conn.errors("publishing a worker's models"):
            px = max(1, int(ttl_s * 1000))
            await self._conn.client.set(key, json.dumps(sorted(models)), px=px)

    async def worker_models(self) -> dict[str, frozenset[str]]:
        async with self._conn.errors("reading the workers' models"):
            found = [k async for k in self._conn.client.scan_iter(
                match=keys.WORKER_MODELS_PREFIX + "*", count=100)]
            values = await self._conn.client.mget(found) if found else []
        out: dict[str, frozenset[str]] = {}
        for key, value in zip(found, values, strict=True):
            if value is None:  # lapsed between the scan and the read
                continue
            name = key.decode() if isinstance(key, bytes) else str(key)
            try:
                models = json.loads(value)
            except ValueError:
                log.warning("ignoring %s: not a JSON list", name)
                continue
            out[name.removeprefix(keys.WORKER_MODELS_PREFIX)] = frozenset(map(str, models))
        return out

    async def publish_demand(
        self, dispatcher: str, demand: Mapping[str, Mapping[str, float]], ttl_s: float
    ) -> None:
        key = keys.demand_key(dispatcher)
        value = json.dumps({c: {k: float(v) for k, v in d.items()} for c, d in demand.items()})
        async with self._conn.errors("publishing the queue's demand"):
            await self._conn.client.set(key, value, px=max(1, int(ttl_s * 1000)))

    async def withdraw_demand(self, dispatcher: str) -> None:
        key = keys.demand_key(dispatcher)
        async with self._conn.errors("withdrawing the queue's demand"):
            await self._conn.client.delete(key)

    async def demand(self) -> dict[str, dict[str, dict[str, float]]]:
        async with self._conn.errors("reading the queue's demand"):
            found = [k async for k in self._conn.client.scan_iter(
                match=keys.DEMAND_PREFIX + "*", count=100)]
            values = await self._conn.client.mget(found) if found else []
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key, value in zip(found, values, strict=True):
            if value is None:  # lapsed between the scan and the read
                continue
            name = key.decode() if isinstance(key, bytes) else str(key)
            try:
                record = json.loads(value)
                out[name.removeprefix(keys.DEMAND_PREFIX)] = {
                    str(c): {str(k): float(v) for k, v in d.items()} for c, d in record.items()}
            except (ValueError, AttributeError, TypeError):
                log.warning("ignoring %s: not a demand record", name)
        return out


class RedisBroker(Broker):
    """The broker's parts on one Redis. Survives Redis restarts: groups are recreated on
    NOGROUP."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        socket_timeout_s: float = 10.0,
    ) -> None:
        self.connection = RedisConnection(url, socket_timeout_s=socket_timeout_s)
        self.safe_url = self.connection.safe_url
        limits = {"claim_idle_ms": claim_idle_ms, "max_deliveries": max_deliveries}
        self.jobs = RedisJobQueue(self.connection, **limits)
        self.deliveries = RedisDeliveries(self.connection, **limits)
        self.progress = RedisProgress(self.connection)
        self.flags = RedisFlags(self.connection)
        self.registry = RedisRegistry(self.connection)

    async def server_epoch(self) -> str:
        async with self.connection.errors("reading the server epoch"):
            info = await self.connection.client.info("server")
        return str(info["run_id"])

    async def ping(self, timeout_s: float = 1.0) -> bool:
        return await self.connection.ping(timeout_s)

    async def close(self) -> None:
        await self.connection.close()


class _Subscription:
    """Iterates progress events off a pub/sub connection, skipping what is not a JSON object."""

    def __init__(self, conn: RedisConnection, pubsub: Any) -> None:
        self._conn = conn
        self._pubsub = pubsub

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            async with self._conn.errors("reading progress"):
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=None
                )
            if not message or message.get("type") != "message":
                continue
            try:
                event = json.loads(message["data"])
            except (TypeError, ValueError):
                log.debug("ignoring a progress message that is not JSON: %r", message["data"])
                continue
            if isinstance(event, dict):
                return event
