"""The web front end's delivery stream: a job made from the gallery is "delivered" once it is
finished (its images are in the gallery, and an open page shows them over SSE). This loop
confirms each announcement, so the dispatcher stops re-announcing, and acks it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cluster.broker import BrokerUnavailable, DeliveryEntry
from cluster.client import Client
from core.errors import AtelierError
from storage.db import STORE_ERRORS

log = logging.getLogger(__name__)
FRONTEND = "web"
CONSUMER = "web-gallery"  # one name for every web process: any of them may settle any entry
OUTAGES: tuple[type[Exception], ...] = (BrokerUnavailable, *STORE_ERRORS)


async def settle_once(client: Client, *, block_ms: int = 0) -> int:
    """Confirm and ack what is waiting on the web stream (new entries, and any another web
    process left unacked); returns how many entries were settled."""
    broker = client.broker
    entries: list[DeliveryEntry] = await broker.deliveries.read_deliveries(
        FRONTEND, CONSUMER, count=50, block_ms=block_ms
    )
    entries += await broker.deliveries.claim_stale_deliveries(FRONTEND, CONSUMER, count=50)
    for entry in entries:
        job_id = entry.event.get("job_id", "")
        with contextlib.suppress(AtelierError):  # unknown or unfinished: nothing to confirm
            await client.jobs.mark_delivered(job_id)
        await broker.deliveries.ack_delivery(FRONTEND, entry.entry_id)
    return len(entries)


async def settle_deliveries(client: Client, stop: asyncio.Event) -> None:
    """Run ``settle_once`` until ``stop`` is set; a broker or store outage is waited out
    (what was read and not acked is claimed again by the next pass)."""
    while not stop.is_set():
        try:
            await settle_once(client, block_ms=1000)
        except OUTAGES as exc:
            what = "broker" if isinstance(exc, BrokerUnavailable) else "store"
            first = (str(exc).splitlines() or [""])[0]
            log.warning("web deliveries: %s unavailable (%s: %s); retrying", what,
                        type(exc).__name__, first)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5)
