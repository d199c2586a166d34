"""Throughput with 1 vs 2 worker nodes on the same job stream (a script, not a test): a Ray
cluster of this process's own (``ray.cluster_utils.Cluster``: a head with no CPUs, worker nodes
with one CPU and one ``device:cpu`` slot each), one worker actor per node (one torch thread),
the real client, in-process broker, SQLite store and dispatcher; the same jobs (tiny model,
several accounts) submitted at once each round; rounds alternate 1 and 2 nodes (ABBA), and the
figure is the median of per-pair ratios. Goal: >= 1.8x.

Run from the repository root: ``.venv/bin/python -m bench.scale [--jobs 16 --rounds 2]``
(a few minutes on 2 cores). Prints the load average beside the figure: other work on the
machine takes cores from the second node first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from atelier.app import make_client, make_dispatcher, open_db
from cluster.broker_memory import MemoryBroker
from cluster.dispatcher import RAY_NAMESPACE, Pacing
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from core.settings import Tier, load_settings
from engine.actor import spawn_worker
from engine.devices import DeviceInfo, choose_profile
from engine.tiny import make_tiny_models
from storage.db import upgrade


def cpu_profile() -> Any:
    info = DeviceInfo(kind="cpu", name="bench CPU", total_memory=16 * 2**30, cores=1,
                      logical_cpus=1)
    return dataclasses.replace(choose_profile(info, "sd15"), threads=1)


async def stream(settings: Any, handles: list[Any], jobs: int, side: int, steps: int,
                 seed: int) -> float:
    """Seconds from the first submit to the last job done, on the workers ``handles``."""
    with open_db(settings) as (_, sessions):
        broker = MemoryBroker()
        models = ModelRegistry.load(settings)
        client = make_client(settings, sessions, broker, models=models)
        pool = await WorkerPool.from_handles(handles, info_timeout_s=60)
        dispatcher = make_dispatcher(settings, sessions, broker, pool, models=models,
                                     name="bench", pacing=Pacing(heartbeat_s=3600))
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            start = time.perf_counter()
            submitted = [
                await client.submit(
                    GenerationRequest(prompt=f"a lighthouse, take {i}", model="tiny",
                                      width=side, height=side, steps=steps, seed=seed + i,
                                      scheduler="Euler"),
                    Requester(platform="bench", platform_user_id=f"u{i % 8}"),
                    DeliveryTarget(frontend="bench"), uuid.uuid4().hex,
                )
                for i in range(jobs)
            ]
            events = await asyncio.gather(*(client.wait(j.job_id) for j in submitted))
            took = time.perf_counter() - start
            bad = [e for e in events if e.kind != "done"]
            if bad:
                raise RuntimeError(f"{len(bad)} jobs did not succeed: {bad[0]}")
            for j in submitted:  # as a front end would: no re-announcements later
                await client.mark_delivered(j.job_id)
            return took
        finally:
            stop.set()
            await task
            await broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA pairs")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    # Every node on loopback, no token (a private cluster of this process's own).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    with tempfile.TemporaryDirectory(prefix="atelier-scale-") as tmp:
        data = Path(tmp)
        make_tiny_models(data / "models")
        settings = load_settings(
            data_dir=data, default_tier="bench", _env_file=None,
            tiers={"bench": Tier(daily_allowance=10**6, concurrency=10**4, max_side=1024)},
        )
        upgrade(settings.db_url)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        })
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={"device:cpu": 1},
                             node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        try:
            profile = cpu_profile()
            workers = [
                spawn_worker(settings=settings.worker_config(), profile=profile,
                             name=f"scale-{n}", timeout_s=300)
                for n in range(2)
            ]
            nodes = {ray.get(w.info.remote()).node_id for w in workers}
            if len(nodes) != 2:
                raise RuntimeError("the two workers share a node; the figure would mean nothing")
            for w in workers:
                ray.get(w.preload.remote("tiny"), timeout=300)
            times: dict[int, list[float]] = {1: [], 2: []}
            asyncio.run(stream(settings, workers, 4, args.side, args.steps, 0))  # warm-up
            for r in range(args.rounds):
                for n in ((1, 2, 2, 1) if r % 2 == 0 else (2, 1, 1, 2)):
                    took = asyncio.run(
                        stream(settings, workers[:n], args.jobs, args.side, args.steps,
                               1000 * (r + 1))
                    )
                    times[n].append(took)
                    print(f"  round {r}: {n} node(s) {took:6.2f} s", flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    ratios = [a / b for a, b in zip(times[1], times[2], strict=True)]
    load = os.getloadavg()
    print(f"{args.jobs} jobs ({args.side}x{args.side}, {args.steps} steps, tiny model), "
          f"{2 * args.rounds} rounds per setting")
    print(f"  1 node : median {statistics.median(times[1]):6.2f} s "
          f"({args.jobs / statistics.median(times[1]):.2f} jobs/s)")
    print(f"  2 nodes: median {statistics.median(times[2]):6.2f} s "
          f"({args.jobs / statistics.median(times[2]):.2f} jobs/s)")
    print(f"  throughput 2 vs 1 node: {statistics.median(ratios):.2f}x "
          f"(per-pair {', '.join(f'{x:.2f}' for x in ratios)}; goal >= 1.8x)")
    print(f"  load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
