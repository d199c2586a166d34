"""What one chat /imagine costs before it is queued (a script, not a test): requests prepared,
prompts prepared, blocklist checks, Redis round trips and database transactions, counted for
real (the Redis connection's ``execute_command`` and pipelines wrapped, SQLAlchemy's engine
``begin`` event), plus the wall time of admission, for this tree and for an earlier commit
(``--before``, default the commit before issue 22's one admission), side by side in one run.

``.venv/bin/python -m bench.admission [--before REV] [--requests 20]`` (about 30 s; needs
redis-server on PATH: a private one on a free port; SQLite store, no Ray).

The chat path is what bots/common/jobs.py does at each commit: before, ``Client.quote`` (the
check before anything is posted) then ``Client.submit``; after, ``Jobs.admit`` then
``Jobs.submit(quote)``. Each tree runs in its own process, its own modules first on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The commit before the one admission (issue 22): Client.quote then Client.submit.
BEFORE = "1406641"
COUNTERS = ("requests prepared", "prompts prepared", "blocklist checks", "redis round trips",
            "db transactions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counts:
    """Counters the wrappers below add to while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.n = dict.fromkeys(COUNTERS, 0)

    def add(self, what: str) -> None:
        if self.on:
            self.n[what] += 1


def _wrap(owner: Any, name: str, counts: Counts, what: str) -> None:
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):
        async def awrapped(*args: Any, **kwargs: Any) -> Any:
            counts.add(what)
            return await original(*args, **kwargs)
        setattr(owner, name, awrapped)
    else:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counts.add(what)
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)


def _instrument(counts: Counts, db: Any) -> None:
    """Count at the boundaries, whatever calls them."""
    import redis.asyncio.client as redis_client
    from sqlalchemy import event

    import core.prompts

    # Redis: a command outside a pipeline is one round trip; a pipeline's execute is one.
    command = redis_client.Redis.execute_command

    async def execute_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self, redis_client.Pipeline):
            counts.add("redis round trips")
        return await command(self, *args, **kwargs)

    redis_client.Redis.execute_command = execute_command  # type: ignore[method-assign]
    _wrap(redis_client.Pipeline, "execute", counts, "redis round trips")
    # The database: every transaction begins on the engine (read-only twins share its events).
    event.listen(db, "begin", lambda conn: counts.add("db transactions"))
    # Preparing: a request (the method admission calls), its prompts, the blocklist.
    _wrap(core.prompts.Blocklist, "check", counts, "blocklist checks")
    import cluster.client

    if hasattr(cluster.client, "Jobs"):  # one admission: cluster/jobs.py prepares
        import cluster.jobs

        _wrap(cluster.jobs, "prepare_prompt", counts, "prompts prepared")
        _wrap(cluster.jobs.Jobs, "prepare", counts, "requests prepared")
    else:  # before: the client did
        _wrap(cluster.client, "prepare_prompt", counts, "prompts prepared")
        _wrap(cluster.client.Client, "prepare", counts, "requests prepared")


async def _measure(redis_url: str, requests: int) -> dict[str, Any]:
    """Run ``requests`` chat /imagines (warmed up by one) against this process's tree."""
    from atelier.service import make_client, open_db

    from cluster.broker_redis import RedisBroker
    from cluster.registry import ModelRegistry
    from core.jobs import DeliveryTarget, Requester
    from core.request import GenerationRequest
    from core.settings import Tier, load_settings
    from storage.db import upgrade

    with tempfile.TemporaryDirectory(prefix="atelier-admission-") as tmp:
        data = Path(tmp)
        settings = load_settings(  # no job runs here: a tier that queues them all
            data_dir=data, redis_url=redis_url, _env_file=None, default_tier="bench",
            tiers={"bench": Tier(daily_allowance=10**6, concurrency=10**4, max_side=1024)},
        )
        upgrade(settings.db_url)
        # The shipped registry (a default and the demo model as its fallback); the workers
        # can load the demo model, so a prompt naming none runs on it.
        registry = ModelRegistry.load(settings)
        with open_db(settings) as (db, sessions):
            broker = RedisBroker(redis_url)
            client = make_client(settings, sessions, broker, models=registry)
            # What a dispatcher publishes: the workers can load the demo model.
            await broker.publish_worker_models("bench-worker", ["demo"], 60)
            counts = Counts()
            _instrument(counts, db)
            jobs = getattr(client, "jobs", None)

            async def imagine(user: int) -> None:
                # What the bot makes of "/imagine a lighthouse at dusk" in a chat.
                request = GenerationRequest(prompt="a lighthouse at dusk")
                requester = Requester(platform="telegram", platform_user_id=str(user),
                                      display_name=f"user {user}")
                key = f"telegram:{user}:{uuid.uuid4().hex}"
                delivery = DeliveryTarget(frontend="telegram", chat_id=str(user),
                                          message_id="1")
                if jobs is not None:  # one admission
                    quote = await jobs.admit(request, requester, key)
                    await jobs.submit(quote, delivery)
                else:  # before: check, then submit (which checks again)
                    quote = await client.quote(request, requester, key)
                    await client.submit(quote.request, requester, delivery, key)

            await imagine(1)  # first contact, caches warm: not what this measures
            counts.on = True
            for _ in range(requests):
                await imagine(1)  # a returning user, as most are
            counts.on = False
            walls = []
            for i in range(requests):
                began = time.perf_counter()
                await imagine(2 + i % 3)
                walls.append(time.perf_counter() - began)
            await broker.close()
    return {
        "counts": {k: v / requests for k, v in counts.n.items()},
        "p50_ms": statistics.median(walls) * 1000,
        "where": str(Path(__import__("cluster").__file__).parents[1]),
    }


def _child(tree: Path, redis_url: str, requests: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "ATELIER_BENCH_TREE": str(tree)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--redis", redis_url,
         "--requests", str(requests)],
        env=env, capture_output=True, text=True, cwd=tree,
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tree = os.environ["ATELIER_BENCH_TREE"]
        sys.path.insert(0, tree)
        for name in [m for m in sys.modules if m.split(".")[0] in ("cluster", "core", "storage",
                                                                    "atelier", "bots", "web")]:
            del sys.modules[name]
        sys.stdout.write(json.dumps(asyncio.run(_measure(args.redis, args.requests))) + "\n")
        return
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH")
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="atelier-before-") as tmp:
            before_tree = Path(tmp)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
            time.sleep(0.3)  # redis-server listening
            url = f"redis://127.0.0.1:{port}/0"
            before = _child(before_tree, url, args.requests)
            after = _child(ROOT, url, args.requests)
    finally:
        server.terminate()
        server.wait(10)
    print(f"\nOne chat /imagine before it is queued (a returning user; {args.requests} "
          f"requests, per request; the counts include the one enqueue)")
    print(f"{'':<22}{'before ' + args.before:>16}{'after':>10}")
    for name in COUNTERS:
        print(f"{name:<22}{before['counts'][name]:>16.1f}{after['counts'][name]:>10.1f}")
    print(f"{'admission p50 ms':<22}{before['p50_ms']:>16.1f}{after['p50_ms']:>10.1f}"
          f"   (ratio {before['p50_ms'] / after['p50_ms']:.2f}x)")


if __name__ == "__main__":
    main()
