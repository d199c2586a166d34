"""Reading a process's /metrics over HTTP in tests: every sample as {(name, labels): value}."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.text()


async def scrape(base: str) -> Samples:
    status, body = await get(base + "/metrics")
    assert status == 200, body
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled child not created yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
