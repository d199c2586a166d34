"""The web front end's delivery stream (``atelier:deliveries:web``). A web job's result is
delivered where its images are stored: the gallery, from which the APIs hand them out (an
``/sdapi/v1`` call also waits and marks its job itself). This loop marks each announced job
delivered and acks the entry, so the dispatcher stops re-announcing it and the stream is trimmed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from cluster.broker import BrokerUnavailable, DeliveryEntry
from cluster.client import Client
from core.errors import AtelierError

log = logging.getLogger(__name__)
WEB = "web"


async def _settle(client: Client, entry: DeliveryEntry) -> None:
    job_id = entry.event.get("job_id")
    if job_id:
        # NotFound / Conflict: nothing this front end can do about that entry but ack it.
        with contextlib.suppress(AtelierError):
            await client.mark_delivered(job_id)
    await client.broker.ack_delivery(WEB, entry.entry_id)


async def drain_web_deliveries(
    client: Client, stop: asyncio.Event, *, consumer: str | None = None, block_ms: int = 1000
) -> None:
    """Until ``stop``: read, mark delivered, ack. Survives broker outages (retries)."""
    consumer = consumer or f"web-{socket.gethostname()}-{os.getpid()}"
    while not stop.is_set():
        try:
            entries = await client.broker.claim_stale_deliveries(WEB, consumer, count=50)
            entries += await client.broker.read_deliveries(
                WEB, consumer, count=50, block_ms=block_ms
            )
            for entry in entries:
                await _settle(client, entry)
        except BrokerUnavailable as exc:
            log.info("web deliveries: broker unavailable (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
