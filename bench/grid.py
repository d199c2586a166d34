"""X/Y/Z grid benchmark (a script, not a test): a 3x3 grid against its 9 cells submitted
separately, side by side in one run on the whole path (client -> in-process broker ->
dispatcher -> one Ray CPU worker running the tiny model -> store), so a busy shared machine
slows both sides alike. Prints medians and ratios.

Three ways to make the same 9 images (one seed axis x one prompt S/R axis, so every cell shares
one batch key):
- grid: ``submit_grid`` (one transaction, one charge; the dispatcher batches the cells);
- burst: 9 ``Client.submit`` calls at once (a script hammering the API: the dispatcher's
  gather window batches them too);
- one by one: submit, wait for the image, then the next (a person typing /imagine 9 times).
And a cfg x steps grid, whose cells cannot share a pipeline call, against its 9 cells one by one.

``.venv/bin/python -m bench.grid [--reps 3] [--side 64] [--steps 4]`` (about 2 minutes on 2
cores; the tiny model is built into a temporary data dir)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atelier.app import make_client, make_dispatcher, open_db
from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.contract import device_resource, init_local_ray
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX
from cluster.grid import quote_grid, submit_grid
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.grid import expand, ordered_axes
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from core.settings import Tier, load_settings
from engine.actor import spawn_worker
from engine.devices import best_device, choose_profile, detect_devices
from engine.tiny import make_tiny_models
from storage.db import upgrade

WHO = Requester(platform="web", platform_user_id="bench", display_name="bench")
BATCHABLE = {"x": "seed=1,2,3", "y": "sr=lighthouse,castle,windmill"}


def _where() -> DeliveryTarget:
    return DeliveryTarget(frontend="web", chat_id="bench", message_id=uuid.uuid4().hex[:8])


async def _wait_all(client: Client, ids: list[str]) -> None:
    finals = await asyncio.gather(*(client.wait(j) for j in ids))
    bad = [f for f in finals if f.kind.value != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs did not finish: {bad[0].reason}")


async def run_grid(client: Client, base: GenerationRequest, axes: dict[str, str]) -> None:
    grid = expand(base, ordered_axes(axes), max_cells=64)
    quote = await quote_grid(client, grid, WHO)
    submitted = await submit_grid(client, quote, WHO, lambda _: _where(), f"g-{uuid.uuid4()}")
    await _wait_all(client, list(submitted.job_ids))


async def run_burst(client: Client, base: GenerationRequest, axes: dict[str, str]) -> None:
    grid = expand(base, ordered_axes(axes), max_cells=64)
    jobs = await asyncio.gather(*(
        client.submit(c.request, WHO, _where(), f"s-{uuid.uuid4()}") for c in grid.cells
    ))
    await _wait_all(client, [j.job_id for j in jobs])


async def run_one_by_one(client: Client, base: GenerationRequest, axes: dict[str, str]) -> None:
    grid = expand(base, ordered_axes(axes), max_cells=64)
    for cell in grid.cells:
        job = await client.submit(cell.request, WHO, _where(), f"o-{uuid.uuid4()}")
        await _wait_all(client, [job.job_id])


@contextlib.asynccontextmanager
async def open_stack(data_dir: Path) -> AsyncIterator[Client]:
    import ray

    make_tiny_models(data_dir / "models")
    settings = load_settings(
        data_dir=data_dir, default_tier="bench",
        tiers={"bench": Tier(daily_allowance=1_000_000, concurrency=64, max_side=1024)},
        _env_file=None,
    )
    settings = settings.model_copy(update={"grid": settings.grid.model_copy(
        update={"max_credits": 10_000})})
    upgrade(settings.db_url)
    store = contextlib.ExitStack()
    _, sessions = store.enter_context(open_db(settings))
    broker = MemoryBroker()
    profile = choose_profile(best_device(detect_devices()))
    await asyncio.to_thread(
        init_local_ray, address="local", resources={device_resource(profile.device_class): 1},
        namespace=RAY_NAMESPACE, log_to_driver=False, object_store_memory=256 * 2**20,
        _system_config={"worker_niceness": 0},
    )
    worker = None
    stop = asyncio.Event()
    task = None
    try:
        worker = await asyncio.to_thread(
            spawn_worker, settings=settings.worker_config(), profile=profile,
            name=f"{WORKER_NAME_PREFIX}-grid-bench", timeout_s=180,
        )
        await worker.preload.remote("tiny")
        registry = ModelRegistry.load(settings)
        pool = await WorkerPool.from_handles([worker])
        client = make_client(settings, sessions, broker, models=registry, poll_interval_s=0.05)
        dispatcher = make_dispatcher(settings, sessions, broker, pool, name="grid-bench",
                                     models=registry)
        task = asyncio.create_task(dispatcher.run(stop))
        yield client
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 60)
        if worker is not None:
            ray.kill(worker)
        await asyncio.to_thread(ray.shutdown)
        await broker.close()
        store.close()


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def run(args: argparse.Namespace) -> None:
    steps = args.steps
    unbatchable = {"x": "cfg=3,7,11", "y": f"steps={steps},{steps + 1},{steps + 2}"}
    base = GenerationRequest(prompt="a lighthouse at dusk", model="tiny", width=args.side,
                             height=args.side, steps=steps, guidance=7.0, scheduler="Euler",
                             seed=7)
    with tempfile.TemporaryDirectory(prefix="atelier-bench-grid-") as tmp:
        async with open_stack(Path(tmp)) as client:
            cases: dict[str, Callable[[], Awaitable[None]]] = {
                "grid 3x3 (seed x prompt S/R)": lambda: run_grid(client, base, BATCHABLE),
                "9 cells submitted at once": lambda: run_burst(client, base, BATCHABLE),
                "9 cells one by one": lambda: run_one_by_one(client, base, BATCHABLE),
                "grid 3x3 (cfg x steps)": lambda: run_grid(client, base, unbatchable),
                "its 9 cells one by one": lambda: run_one_by_one(client, base, unbatchable),
            }
            await run_grid(client, base, BATCHABLE)  # warm-up: the first call compiles caches
            times: dict[str, list[float]] = {name: [] for name in cases}
            for _ in range(args.reps):  # alternated, so a busy moment hits every case
                for name, fn in cases.items():
                    times[name].append(await timed(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"tiny model, {args.side}x{args.side}, {steps} steps, median of {args.reps} runs:")
    for name, seconds in med.items():
        print(f"  {name:32s} {seconds:7.2f} s")
    grid_s = med["grid 3x3 (seed x prompt S/R)"]
    print(f"grid vs 9 one by one:       {med['9 cells one by one'] / grid_s:5.2f}x faster")
    print(f"grid vs 9 submitted at once: {med['9 cells submitted at once'] / grid_s:5.2f}x")
    print(f"cfg x steps grid vs its cells one by one: "
          f"{med['its 9 cells one by one'] / med['grid 3x3 (cfg x steps)']:5.2f}x faster")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
