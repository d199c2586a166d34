"""Concurrent submits to the single-box SQLite store (a script, not a test): eight people's
jobs submitted at once, writers queued on the store's in-process lock vs left to SQLite's busy
handler (which sleeps 1, 2, 5, 10 ... ms between tries), alternating rounds in one run.

``.venv/bin/python -m bench.submits [--rounds 16] [--burst 8]`` (about 10 s; no Redis, no Ray:
the in-process broker)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import storage.db as store_db
from atelier.app import make_client, open_db
from bench.pipeline import TINY, TINY_SIDE, delivery, request, requester
from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.settings import Tier, load_settings
from engine.tiny import make_tiny_models
from storage.db import upgrade


async def burst(client: Client, size: int, seed: int) -> tuple[float, float]:
    """Submit ``size`` jobs at once; (first, last) seconds until their submit returned."""
    start = time.perf_counter()
    done: list[float] = []

    async def one(i: int) -> None:
        await client.submit(request(TINY, TINY_SIDE, seed=seed + i), requester(f"u{i}"),
                            delivery(), uuid.uuid4().hex)
        done.append(time.perf_counter() - start)

    await asyncio.gather(*(one(i) for i in range(size)))
    return min(done), max(done)


async def run(rounds: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        data = Path(tmp)
        make_tiny_models(data / "models")
        settings = load_settings(
            data_dir=data, default_tier="bench", _env_file=None,
            tiers={"bench": Tier(daily_allowance=10**6, concurrency=10**4, max_side=1024)},
        )
        upgrade(settings.db_url)
        with open_db(settings) as (_, sessions):
            client = make_client(settings, sessions, MemoryBroker(),
                                 models=ModelRegistry.load(settings))
            with_lock = store_db._sqlite_writer_lock
            variants: dict[str, Any] = {
                "writer lock": with_lock, "busy handler": lambda _: None,
            }
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
            try:
                for n in range(2 + rounds):  # two warm-up rounds (accounts, caches)
                    order = variants.items() if n % 2 else reversed(variants.items())
                    for name, lock in order:
                        store_db._sqlite_writer_lock = lock
                        result = await burst(client, size, seed=1000 * n)
                        if n >= 2:
                            times[name].append(result)
            finally:
                store_db._sqlite_writer_lock = with_lock
    print(f"{size} concurrent submits, SQLite store, median of {rounds} rounds")
    for name, values in times.items():
        first = statistics.median(a for a, _ in values) * 1000
        last = statistics.median(b for _, b in values) * 1000
        print(f"  {name:<13} first done {first:6.1f} ms, last done {last:6.1f} ms")
    gain = statistics.median(
        b / a for (_, a), (_, b) in zip(times["writer lock"], times["busy handler"], strict=True)
    )
    print(f"  last done, busy handler / writer lock: {gain:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--burst", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.burst))


if __name__ == "__main__":
    main()
