"""Load benchmark of the Discord front end: N people run /imagine at the same moment through the
fake Discord (testing/discord: REST + gateway) into the real discord.py bot, Redis
broker, SQLite store, dispatcher and a local Ray worker with the tiny pipeline. Prints the time
from each interaction to its defer (Discord wants one within 3 s; goal p99 <= 300 ms) and to its
images, p50/p99/max.

    .venv/bin/python bench/discord_load.py [--users 50] [--size 64] [--steps 2] [--workers 1]
        [--timeout 600] [--log-level WARNING]

Needs redis-server on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.telegram_load import _pct, _start_redis  # noqa: E402

FIRST_USER = 200_000_000_000_000_000
DEFER_GOAL_S = 0.300


async def run(args: argparse.Namespace, tmp: Path, redis_url: str) -> None:
    import ray

    from atelier.app import make_client, make_dispatcher, open_db
    from bots.common.state import MemoryState
    from bots.discord.run import start_bot
    from cluster.broker_redis import RedisBroker
    from cluster.contract import init_local_ray
    from cluster.placement import WorkerPool
    from cluster.registry import ModelRegistry
    from core.heap import freeze_startup_heap
    from core.settings import load_settings
    from engine.actor import spawn_worker
    from engine.tiny import make_tiny_models
    from storage.db import upgrade
    from testing.discord import payloads as p
    from testing.discord.server import TOKEN, FakeDiscord, Interaction

    # 1. The stack: tiny models, Ray worker(s), store, broker, dispatcher, fake Discord, bot.
    make_tiny_models(tmp / "models", seed=0)
    fake = FakeDiscord(TOKEN)
    settings = load_settings(
        data_dir=tmp,
        redis_url=redis_url,
        discord_token=TOKEN,
        discord_api_base_url=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        _env_file=None,
    )
    registry = ModelRegistry.load(settings).with_models(default="tiny")
    init_local_ray(
        address="local",  # never join another Ray running on this machine
        num_cpus=max(2, args.workers),
        resources={"device:cpu": args.workers},
        object_store_memory=200 * 1024 * 1024,
    )
    workers = [
        spawn_worker(settings=settings.worker_config(), device_class="cpu", name=f"bench-{i}")
        for i in range(args.workers)
    ]
    upgrade(settings.db_url)
    store = contextlib.ExitStack()
    _, sessions = store.enter_context(open_db(settings))
    broker = RedisBroker(redis_url)
    client = make_client(settings, sessions, broker, models=registry)
    stop = asyncio.Event()
    dispatcher = make_dispatcher(
        settings, sessions, broker, await WorkerPool.from_handles(workers), name="bench",
        models=registry,
    )
    dispatching = asyncio.create_task(dispatcher.run(stop))
    await fake.start()
    bot = await start_bot(settings, client, broker, state=MemoryState(), reconnect=False,
                          guild_ready_timeout=0.05)
    freeze_startup_heap()  # as `atelier up` and `atelier bot discord` do once started

    def images(inter: Interaction) -> list[object]:
        return [c for c in fake.calls_to("POST /webhooks/") if inter.token in c.path and c.files]

    # 2. Warm the model up (a first load is not what this measures).
    flags = f"--w {args.size} --h {args.size} --steps {args.steps}"
    warm = await fake.slash(FIRST_USER - 1, "imagine", [p.option("prompt", f"warm up {flags}")])
    await fake.wait_for(lambda: images(warm), 300, "the warm-up image")

    # 3. Everyone at once.
    users = [FIRST_USER + i for i in range(args.users)]
    started = time.monotonic()
    inters = await asyncio.gather(
        *(fake.slash(u, "imagine", [p.option("prompt", f"a lighthouse at dusk {flags}")])
          for u in users)
    )
    timed_out = False
    try:
        await fake.wait_for(lambda: all(images(i) for i in inters), args.timeout, "every image")
    except AssertionError:
        timed_out = True  # reported below with what did arrive
    finally:
        elapsed = time.monotonic() - started
        defers = [i.callback.at - i.sent_at for i in inters if i.callback is not None]
        done = [(i, c) for i in inters if (c := images(i))]
        to_image = [c[0].at - i.sent_at for i, c in done]  # type: ignore[attr-defined]
        posted = sum(len(c) for _, c in done)
        batches = len(dispatcher.batches)
        await bot.stop()
        stop.set()
        await dispatching
        await fake.stop()
        await broker.close()
        store.close()
        ray.shutdown()

    # 4. The table.
    print(
        f"\nDiscord load: {args.users} people, /imagine {flags}, {args.workers} CPU worker(s), "
        f"{batches} batches, {elapsed:.1f} s in all"
    )
    print(f"{'':<22}{'n':>5}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, values in (("interaction->defer", defers), ("interaction->image", to_image)):
        if values:
            print(
                f"{name:<22}{len(values):>5}{statistics.median(values) * 1000:>10.0f}"
                f"{_pct(values, 99) * 1000:>10.0f}{max(values) * 1000:>10.0f}"
            )
        else:
            print(f"{name:<22}{0:>5}")
    p99 = _pct(defers, 99) if defers else float("inf")
    verdict = "met" if p99 <= DEFER_GOAL_S else "MISSED"
    print(f"defer p99 goal <= {DEFER_GOAL_S * 1000:.0f} ms: {verdict}")
    print(f"deferred: {len(defers)}/{args.users}; with images: {len(done)}/{args.users}; "
          f"image messages: {posted}")
    if timed_out:
        raise SystemExit(f"not every image arrived within {args.timeout:.0f} s")
    if len(defers) < args.users or posted != len(done):
        raise SystemExit("an interaction was not deferred, or its images came twice")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        proc, url = _start_redis(Path(tmp))
        try:
            asyncio.run(run(args, Path(tmp), url))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
