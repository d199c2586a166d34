"""Web API benchmark (a script, not a test): ``/sdapi/v1/txt2img`` end to end over HTTP (auth,
A1111 translation, submit, wait, base64 PNGs) against the same job through the queue directly
(``Client.submit`` + ``Client.wait`` + the PNG bytes), side by side in ABBA order so a busy
machine slows both alike. Goal: sdapi / direct <= 1.05 (median of per-round ratios).

Run from the repository root: ``.venv/bin/python -m bench.web_api [--rounds 8] [--size 256]
[--steps 20]``. Everything is in this process but the Ray worker: a SQLite store in a temp dir,
the in-process broker (``--redis URL`` for Redis), the tiny model, uvicorn on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import uvicorn

from atelier.app import connect_broker
from cluster.client import Client
from cluster.contract import init_local_ray
from cluster.dispatcher import Dispatcher
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.jobs import DeliveryTarget, Requester
from core.prompts import default_blocklist
from core.request import GenerationRequest
from core.settings import Tier, load_settings
from core.styles import default_registry
from engine.actor import spawn_worker
from engine.tiny import make_tiny_models
from storage import accounts, apikeys
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, transaction, upgrade
from web.app import create_app
from web.context import WebContext

GOAL = 1.05


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-web-"))
    make_tiny_models(tmp / "models", seed=0)
    (tmp / "models.toml").write_text('default = "tiny"\n')
    settings = load_settings(
        data_dir=tmp, database_url=f"sqlite:///{tmp / 'atelier.db'}", redis_url=args.redis,
        signing_key="k" * 40, _env_file=None,
        tiers={"free": Tier(daily_allowance=100_000, concurrency=4, max_side=2048)},
    )
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = session_factory(engine)
    broker = await connect_broker(args.redis)
    blobs = BlobStore.from_settings(settings)
    registry = ModelRegistry.load(settings).with_models(default="tiny")
    client = Client(settings=settings, session_factory=sessions, broker=broker, blobs=blobs,
                    models=registry,
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    init_local_ray(address="local", num_cpus=2, resources={"device:cpu": 1})
    worker = spawn_worker(settings=settings, device_class="cpu", name="bench-web-worker",
                          num_cpus=0, resources={})
    pool = await WorkerPool.from_handles([worker])
    stop = asyncio.Event()
    dispatcher = Dispatcher(dispatch=settings.dispatch, sessions=sessions, broker=broker,
                            blobs=blobs, workers=pool, name="bench-web", models=registry)
    dispatching = asyncio.create_task(dispatcher.run(stop))

    with transaction(sessions) as s:
        acc = accounts.resolve_account(session=s, platform="bench", platform_user_id="1",
                                       default_tier="free")
        assert acc.identity is not None
        key = apikeys.create_api_key(session=s, identity_id=acc.identity.id).key
    requester = Requester(platform="bench", platform_user_id="1")

    app = create_app(WebContext(settings=settings, sessions=sessions, blobs=blobs,
                                client=client))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    server = _InLoopServer(uvicorn.Config(app, log_level="warning", lifespan="off",
                                          access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    payload = {"prompt": "a lighthouse at dusk", "steps": args.steps, "width": args.size,
               "height": args.size, "seed": -1, "sampler_name": "Euler a"}
    request = GenerationRequest(prompt=payload["prompt"], steps=args.steps, width=args.size,
                                height=args.size, raw=True)  # a new random seed each job

    async def direct() -> int:
        job = await client.submit(request, requester, DeliveryTarget(frontend="web"),
                                  f"bench:{uuid.uuid4()}")
        final = await client.wait(job.job_id)
        pngs = [await client.image_bytes(ref) for ref in final.images]
        await client.mark_delivered(job.job_id)
        return len(pngs)

    http = httpx.AsyncClient(base_url=url, timeout=600, auth=("bench", key))

    async def sdapi() -> int:
        r = await http.post("/sdapi/v1/txt2img", json=payload)
        r.raise_for_status()
        return len([base64.b64decode(i) for i in r.json()["images"]])

    async def timed(fn: Callable[[], Awaitable[int]]) -> float:
        t0 = time.perf_counter()
        assert await fn() == 1
        return time.perf_counter() - t0

    try:
        await timed(direct)  # warm-up: the model loads on the worker once
        await timed(sdapi)
        a_times: list[float] = []
        b_times: list[float] = []
        ratios: list[float] = []
        for n in range(args.rounds):
            order = [direct, sdapi] if n % 2 == 0 else [sdapi, direct]  # ABBA
            got = {fn.__name__: await timed(fn) for fn in order}
            a_times.append(got["direct"])
            b_times.append(got["sdapi"])
            ratios.append(got["sdapi"] / got["direct"])
            print(f"round {n + 1}: direct {got['direct'] * 1000:7.1f} ms  "
                  f"sdapi {got['sdapi'] * 1000:7.1f} ms  ratio {ratios[-1]:.3f}")
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio <= GOAL else "MISSED"
        print(f"\n/sdapi/v1/txt2img vs queue directly ({args.size}x{args.size}, {args.steps} "
              f"steps, tiny model, {args.rounds} rounds):")
        print(f"  direct median {statistics.median(a_times) * 1000:.1f} ms, sdapi median "
              f"{statistics.median(b_times) * 1000:.1f} ms")
        diffs = [b - a for a, b in zip(a_times, b_times, strict=True)]
        print(f"  ratio (median of per-round) {ratio:.3f}  "
              f"[min {min(ratios):.3f}, max {max(ratios):.3f}]  goal <= {GOAL}: {verdict}")
        print(f"  sdapi - direct per round: median {statistics.median(diffs) * 1000:+.1f} ms")
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs (others' work slows either side at random)")
    finally:
        await http.aclose()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 5)
        stop.set()
        await asyncio.wait_for(dispatching, 60)
        await broker.close()
        engine.dispose()


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--redis", default=None, help="a Redis URL (default: in-process broker)")
    args: Any = parser.parse_args(argv)
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
