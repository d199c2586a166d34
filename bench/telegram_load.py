"""Load benchmark of the Telegram front end: N users send /imagine at the same moment through the
fake Bot API (tests/bots/fake_telegram.py) into the real bot, Redis broker, SQLite store,
dispatcher and a local Ray worker with the tiny pipeline. Prints time to the first reply (the
status message) and to the image, p50/p99/max.

    .venv/bin/python bench/telegram_load.py [--users 50] [--size 64] [--steps 2] [--workers 1]
        [--timeout 600] [--log-level INFO] [--overall-per-s 30] [--no-freeze]

Needs redis-server on PATH. The bot runs with Telegram's real flood limits (30 messages/s
overall, ~1/s per chat), so the numbers include that pacing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKEN = "123456789:AAF-bench-token"
FIRST_USER = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH")
    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("redis-server did not start")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run(args: argparse.Namespace, tmp: Path, redis_url: str) -> None:
    import ray

    from atelier.app import make_client, make_dispatcher, open_db
    from bots.common.state import MemoryState
    from bots.telegram.ratelimit import FloodLimiter
    from bots.telegram.run import start_bot
    from cluster.broker_redis import RedisBroker
    from cluster.contract import init_local_ray
    from cluster.placement import WorkerPool
    from cluster.registry import ModelRegistry
    from core.heap import freeze_startup_heap
    from core.settings import load_settings
    from engine.actor import spawn_worker
    from engine.tiny import make_tiny_models
    from storage.db import upgrade
    from testing.telegram import FakeTelegram

    # 1. The stack: tiny models, Ray worker(s), store, broker, dispatcher, fake API, bot.
    make_tiny_models(tmp / "models", seed=0)
    fake = FakeTelegram(TOKEN)
    settings = load_settings(
        data_dir=tmp,
        redis_url=redis_url,
        telegram_token=TOKEN,
        telegram_api_base_url=fake.base_url,
        telegram_file_base_url=fake.base_file_url,
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
    bot = await start_bot(
        settings,
        client,
        broker,
        state=MemoryState(),
        poll_timeout=1,
        rate_limiter=FloodLimiter(overall_per_s=args.overall_per_s),
    )
    if not args.no_freeze:
        freeze_startup_heap()  # as `atelier up` and `atelier bot telegram` do once started

    # 2. Warm the model up (a first load is not what this measures).
    await fake.send(FIRST_USER - 1, f"/imagine warm up --w {args.size} --h {args.size} --steps 1")
    await fake.wait_call("sendPhoto", chat=FIRST_USER - 1, timeout=300)

    # 3. Everyone at once.
    users = [FIRST_USER + i for i in range(args.users)]
    flags = f"--w {args.size} --h {args.size} --steps {args.steps}"
    # One prompt for all (no numbers in it: the blocklist reads "10011" as leetspeak).
    updates = [fake.message(u, f"/imagine a lighthouse at dusk {flags}") for u in users]
    started = time.monotonic()
    await fake.push_many(updates)
    timed_out = False
    try:
        await fake.wait_for(
            lambda: all(fake.calls_of("sendPhoto", chat=u) for u in users),
            timeout=args.timeout,
            what="every image",
        )
    except AssertionError:
        timed_out = True  # reported below with what did arrive
    finally:
        elapsed = time.monotonic() - started
        firsts = [c.at - started for u in users if (c := _first(fake, "sendMessage", u))]
        images = [c.at - started for u in users if (c := _first(fake, "sendPhoto", u))]
        photos = sum(len(fake.calls_of("sendPhoto", chat=u)) for u in users)
        edits = sum(len(fake.calls_of("editMessageText", chat=u)) for u in users)
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
        f"\nTelegram load: {args.users} users, /imagine {flags}, {args.workers} CPU worker(s), "
        f"{batches} batches, {elapsed:.1f} s in all"
    )
    print(f"{'':<22}{'n':>5}{'p50 s':>9}{'p99 s':>9}{'max s':>9}")
    for name, values in (("first reply", firsts), ("image", images)):
        if values:
            print(
                f"{name:<22}{len(values):>5}{statistics.median(values):>9.2f}"
                f"{_pct(values, 99):>9.2f}{max(values):>9.2f}"
            )
        else:
            print(f"{name:<22}{0:>5}")
    print(
        f"users with a first reply: {len(firsts)}/{args.users}; "
        f"with an image: {len(images)}/{args.users}; photos sent: {photos}; "
        f"status edits: {edits}{' (start-up heap not frozen)' if args.no_freeze else ''}"
    )
    if timed_out:
        raise SystemExit(f"not every image arrived within {args.timeout:.0f} s")
    if len(firsts) < args.users or photos != len(images):
        raise SystemExit("a user got no first reply, or an image twice")


def _first(fake: object, method: str, chat: int) -> object | None:
    calls = fake.calls_of(method, chat=chat)  # type: ignore[attr-defined]
    return calls[0] if calls else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the start-up heap to the garbage collector (core/heap.py)")
    parser.add_argument(
        "--overall-per-s",
        type=float,
        default=30.0,
        help="the bot's overall flood budget (Telegram's is about 30 messages/s); a higher "
        "one shows what the rest of the path costs",
    )
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
