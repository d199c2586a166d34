"""Job-pipeline benchmarks (a script, not a test): the whole path (client -> Redis -> dispatcher
-> Ray worker -> store) against raw Diffusers calls on this CPU, side by side in one run, so a
busy shared machine slows both sides alike. Prints each result as a ratio against its goal.

Run from the repository root, with Redis at 127.0.0.1:6379:
``.venv/bin/python -m bench.pipeline [--quick] [--only p1,p3]``. Full: the tiny model and the
SD1.5-shaped one (built once into ``--cache-dir``, ~2 GB, ~30 s), about 25 minutes on 2 cores
without bf16 (an SD-shaped image takes ~15 s there); ``--quick``: the tiny model only, 1-2
minutes. Uses Redis database 12 by default and deletes
its ``atelier:*`` keys before and after.

The last column says how much CPU other people's processes took meanwhile: on 2 cores even
half a core of theirs slows torch's two threads a lot (each op waits for the slower one).
Rounds of measurements during which others used more than QUIET_CORES are run again when time
allows, and left out of the medians when enough quiet ones exist."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from atelier.app import connect_broker, make_client, make_dispatcher, open_db
from cluster import keys
from cluster.broker_redis import RedisBroker
from cluster.client import Client
from cluster.contract import BatchItem, device_resource, init_local_ray, run_batch
from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX, Dispatcher
from cluster.events import EventKind
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.jobs import DeliveryTarget, Requester
from core.prompts import default_blocklist, prepare_prompt
from core.request import GenerationRequest
from core.settings import Settings, Tier, load_settings
from core.styles import default_registry
from engine.actor import WORKER_ENV, spawn_worker
from engine.cache import ModelCache
from engine.devices import DeviceProfile, best_device, choose_profile, detect_devices
from engine.tiny import make_sd15_shaped, make_tiny_models
from storage.db import upgrade

STEPS = 4
GUIDANCE = 7.0
SCHEDULER = "Euler"  # what the saved pipelines carry, so raw calls and jobs use the same one
TINY, TINY_SIDE = "tiny", 64
SD, SD_SIDE = "sd15-shaped", 256
PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a castle on a hill", "a boat on a lake")
STYLES = ("watercolor", "anime", "pixel-art", "cinematic")
BURST = 8  # P2: concurrent single-image jobs
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
DEFAULT_CACHE = Path.home() / ".cache" / "atelier-bench"
SD_FOLDER = "sd15-shaped-bf16-seed0"
# A round of measurements counts as quiet when other processes used at most this many cores.
QUIET_CORES = 0.25
STARTED = time.perf_counter()


# Results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One printed line: what was measured, the ratio, the goal and whether it was met
    (``ok`` None: information only, no goal applies)."""

    label: str
    measured: str
    ratio: str
    goal: str
    ok: bool | None
    others: str = ""  # CPU cores other people's processes used meanwhile (a shared machine)

    def line(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "info"}[self.ok]
        return (f"{self.label:<37} {self.measured:<82} {self.ratio:>7}  {self.goal:<28} "
                f"{verdict:<7} {self.others}")


HEADER = Result("benchmark", "measured", "ratio", "goal", None, "others' CPU, took").line().replace(
    "info   ", "verdict"
)


def report(results: list[Result], *, result: Result, load: LoadMeter | None = None) -> None:
    if load is not None:
        took = time.perf_counter() - load.started
        result = replace(result, others=f"{load.describe()}, {took:.0f}s")
    results.append(result)
    print(result.line(), flush=True)


class LoadMeter:
    """CPU that processes outside this benchmark (this process and its children, Ray's
    included) used since it was made: what a shared machine took from the measurements."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        try:
            import psutil
        except ImportError:  # only the "others" column is lost
            self._psutil: Any = None
            return
        self._psutil = psutil
        self._me = psutil.Process()
        self._busy0 = self._busy()
        self._first: dict[int, float] = {}  # our processes' CPU seconds when first seen
        self._used: dict[int, float] = {}  # and since then
        self._sample()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        parts = ("user", "nice", "system", "irq", "softirq", "steal")
        return float(sum(getattr(t, name, 0.0) for name in parts))

    def _sample(self) -> None:
        for proc in [self._me, *self._me.children(recursive=True)]:
            with contextlib.suppress(self._psutil.Error):
                t = proc.cpu_times()
                first = self._first.setdefault(proc.pid, t.user + t.system)
                self._used[proc.pid] = t.user + t.system - first

    def cores(self) -> float | None:
        """Cores others used on average so far; None without psutil."""
        if self._psutil is None:
            return None
        self._sample()
        wall = time.perf_counter() - self.started
        return max(0.0, self._busy() - self._busy0 - sum(self._used.values())) / wall

    def describe(self) -> str:
        cores = self.cores()
        return "?" if cores is None else f"{cores:.1f} cores"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass(frozen=True)
class Rounds:
    """Seconds per variant over the rounds kept: the quiet ones (others used at most
    ``QUIET_CORES`` meanwhile) when there are any, else all of them."""

    times: dict[str, list[float]]
    quiet: int
    total: int

    def med(self, name: str) -> float:
        return median(self.times[name])

    def best(self, name: str) -> float:
        return min(self.times[name])

    def ratios(self, a: str, b: str) -> list[float]:
        """``a``'s time over ``b``'s in each round kept."""
        return [x / y for x, y in zip(self.times[a], self.times[b], strict=True)]

    def ratio(self, a: str, b: str) -> float:
        """The median of ``ratios(a, b)``."""
        return median(self.ratios(a, b))

    def spread(self, a: str, b: str) -> str:
        values = self.ratios(a, b)
        return f"rounds {min(values):.3f}-{max(values):.3f}x"

    @property
    def note(self) -> str:
        if self.quiet:
            return f"med of {self.quiet}/{self.total} quiet rounds"
        return f"med of {self.total} rounds, none quiet"


async def alternate(
    variants: Mapping[str, Callable[[], Awaitable[float]]], reps: int, *, warmup: bool = True,
    extra: int = 0,
) -> Rounds:
    """Run the variants in alternating rounds (after one warm-up each), so a shared machine
    slows every variant alike, until ``reps`` rounds were quiet or ``reps + extra`` ran.
    Every other round runs them in reverse order (A B C, C B A, ...): this machine's speed
    drifts by 10% and more within a minute, and a drift then favours no variant."""
    if warmup:
        for run in variants.values():
            await run()
    rounds: list[tuple[dict[str, float], bool]] = []
    while sum(q for _, q in rounds) < reps and len(rounds) < reps + extra:
        meter = LoadMeter()
        order = list(variants.items())
        if len(rounds) % 2:
            order.reverse()
        times = {name: await run() for name, run in order}
        cores = meter.cores()
        rounds.append((times, cores is None or cores <= QUIET_CORES))
    kept = [t for t, quiet in rounds if quiet] or [t for t, _ in rounds]
    quiet = sum(q for _, q in rounds)
    return Rounds({name: [t[name] for t in kept] for name in variants}, quiet, len(rounds))


# The stack -------------------------------------------------------------------------------------


class TimedBroker(RedisBroker):
    """The client's broker, remembering when each job's XADD returned (the enqueue time)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.enqueued: dict[str, float] = {}
        plain = self.jobs.enqueue

        async def enqueue(job_id: str, fields: Mapping[str, str] | None = None) -> str:
            entry = await plain(job_id, fields)
            self.enqueued[job_id] = time.perf_counter()
            return entry

        self.jobs.enqueue = enqueue  # type: ignore[method-assign]


@dataclass
class ProgressLog:
    """When (perf_counter) each job's first event of each kind reached a pub/sub listener."""

    first: dict[tuple[str, str], float] = field(default_factory=dict)

    def at(self, job_id: str, kind: EventKind) -> float:
        return self.first[(job_id, kind.value)]


@dataclass
class Stack:
    """Client, broker, one Ray worker and what a dispatcher needs, as ``atelier up`` wires them
    (a dispatcher is started per scenario, with that scenario's batching options)."""

    settings: Settings
    client: Client
    client_broker: TimedBroker
    make_dispatcher: Callable[[Settings], Dispatcher]
    worker: Any
    raw: RawProcess  # raw pipeline calls in a process of their own, with the worker's malloc
    plain: RawProcess  # and in a plain process (glibc's default malloc), as a script would

    @contextlib.asynccontextmanager
    async def serving(self, **dispatch: Any) -> AsyncIterator[Dispatcher]:
        """A running dispatcher (production defaults, overridden by ``dispatch``: fields of
        ``Dispatch``), warmed up with one tiny job so its start-up housekeeping stays out of
        the timings."""
        tuned = self.settings.dispatch.model_copy(update=dispatch)
        dispatcher = self.make_dispatcher(self.settings.model_copy(update={"dispatch": tuned}))
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await self.job(request(TINY, TINY_SIDE, seed=1), "warm-up")
            yield dispatcher
        finally:
            stop.set()
            await asyncio.wait_for(task, 120)

    async def job(self, req: GenerationRequest, user: str) -> tuple[float, str, float]:
        """Submit one job and wait for its terminal event: (seconds, job id, perf_counter at
        the end). Then, untimed, tell the store it was delivered, as a front end does (else
        the dispatcher's reconciler keeps re-announcing every job the bench ran)."""
        start = time.perf_counter()
        sub = await self.client.submit(req, requester(user), delivery(), uuid.uuid4().hex)
        end = await self.client.wait(sub.job_id)
        done = time.perf_counter()
        if end.kind is not EventKind.done:
            raise RuntimeError(f"job {sub.job_id} ended {end.kind.value}: {end.reason}")
        await self.client.mark_delivered(sub.job_id)
        return done - start, sub.job_id, done

    @contextlib.asynccontextmanager
    async def progress_log(self) -> AsyncIterator[ProgressLog]:
        """Every job's progress messages, heard on a pattern subscription of its own."""
        import redis.asyncio as aioredis

        seen = ProgressLog()
        conn = aioredis.Redis.from_url(str(self.settings.redis_url), decode_responses=True)
        pubsub = conn.pubsub()
        await pubsub.psubscribe(keys.PROGRESS_PREFIX + "*")
        while (m := await pubsub.get_message(timeout=5)) is None or m["type"] != "psubscribe":
            pass  # subscribed only once confirmed

        async def listen() -> None:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if not message or message.get("type") != "pmessage":
                    continue
                now = time.perf_counter()
                event = json.loads(message["data"])
                seen.first.setdefault((event["job_id"], event["kind"]), now)

        task = asyncio.create_task(listen())
        try:
            yield seen
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            await pubsub.aclose()
            await conn.aclose()


def requester(user: str) -> Requester:
    return Requester(platform="web", platform_user_id=user, display_name=user)


def delivery() -> DeliveryTarget:
    return DeliveryTarget(frontend="web", chat_id="bench", message_id=uuid.uuid4().hex[:8])


def request(
    model: str, side: int, *, seed: int, prompt: str = PROMPTS[0], styles: Sequence[str] = ()
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model=model, width=side, height=side, steps=STEPS, guidance=GUIDANCE,
        scheduler=SCHEDULER, seed=seed, styles=tuple(styles),
    )


def ensure_sd15_shaped(cache_dir: Path) -> Path:
    """The SD1.5-shaped random pipeline as a Diffusers folder (bf16), built on first use."""
    target = cache_dir / SD_FOLDER
    if (target / "model_index.json").is_file():
        return target
    print(f"building the SD1.5-shaped model into {target} (once, ~2 GB)...", flush=True)
    partial = cache_dir / f".{SD_FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    make_sd15_shaped(partial, seed=0, dtype=torch.bfloat16)
    partial.rename(target)  # only a complete folder counts
    return target


def clear_redis(url: str) -> None:
    """Delete Atelier's keys in the bench's Redis database (streams, groups, flags)."""
    import redis

    conn = redis.Redis.from_url(url)
    try:
        names = list(conn.scan_iter(match=f"{keys.PREFIX}:*", count=1000))
        if names:
            conn.delete(*names)
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def open_stack(data_dir: Path, redis_url: str, sd_path: Path | None) -> AsyncIterator[Stack]:
    import ray

    # 1. Models and settings: the tiny ones, the SD1.5-shaped one from the cache (full mode).
    make_tiny_models(data_dir / "models")
    if sd_path is not None:
        (data_dir / "models.toml").write_text(
            f"[models.{SD}]\n"
            'description = "SD1.5-shaped random weights (benchmarks)"\n'
            f"path = {json.dumps(str(sd_path))}\n"
            'family = "sd15"\n'
            "min_vram_gb = 0\n"
            f'scheduler = "{SCHEDULER}"\n',
            "utf-8",
        )
    settings = load_settings(
        data_dir=data_dir, redis_url=redis_url, default_tier="bench",
        tiers={"bench": Tier(daily_allowance=1_000_000, concurrency=64, max_side=1024)},
        _env_file=None,
    )
    # 2. Store and broker (one for the dispatchers, one for the client, as in separate
    #    processes).
    upgrade(settings.db_url)
    store = contextlib.ExitStack()
    _, sessions = store.enter_context(open_db(settings))
    clear_redis(redis_url)
    broker = await connect_broker(redis_url, fallback=False)
    client_broker = TimedBroker(redis_url)
    # 3. Ray on loopback with one CPU worker, its models loaded up front.
    profile: DeviceProfile = choose_profile(best_device(detect_devices()))
    # address="local": a fresh instance of our own, never another process's Ray that
    # ray.init() would otherwise find running on this (shared) machine and join.
    # worker_niceness 0: Ray starts workers at nice 15, so on a machine shared with other
    # work the worker would lose the CPU to it while the raw calls here (nice 0) would not.
    await asyncio.to_thread(
        init_local_ray, address="local", resources={device_resource(profile.device_class): 1},
        namespace=RAY_NAMESPACE, log_to_driver=False, object_store_memory=256 * 2**20,
        _system_config={"worker_niceness": 0},
    )
    # The raw side loads its models meanwhile, the way the worker will (same profile, an
    # 8 GiB cache budget, as a worker given a profile has): once with the worker's malloc
    # settings (like for like), once as a plain process.
    models = [TINY] if sd_path is None else [TINY, SD]
    raw = RawProcess(settings.data_dir, profile, models, env=WORKER_ENV)
    plain = RawProcess(settings.data_dir, profile, models)
    worker = None
    try:
        worker = await asyncio.to_thread(
            spawn_worker, settings=settings.worker_config(), profile=profile,
            name=f"{WORKER_NAME_PREFIX}-bench", timeout_s=180,
        )
        for name in models:
            await worker.preload.remote(name)
        await asyncio.to_thread(raw.ready)
        await asyncio.to_thread(plain.ready)
        registry = ModelRegistry.load(settings)
        pool = await WorkerPool.from_handles([worker])
        client = make_client(settings, sessions, client_broker, models=registry)

        def dispatcher_for(tuned: Settings) -> Dispatcher:
            return make_dispatcher(tuned, sessions, broker, pool, name="bench", models=registry)

        yield Stack(settings, client, client_broker, dispatcher_for, worker, raw, plain)
    finally:
        raw.close()
        plain.close()
        if worker is not None:
            ray.kill(worker)
        await asyncio.to_thread(ray.shutdown)
        await client_broker.close()
        await broker.close()
        store.close()
        clear_redis(redis_url)


# Raw pipeline calls -----------------------------------------------------------------------------


def prepared_prompts(pipe: Any, reqs: Sequence[GenerationRequest]) -> list[tuple[str, str]]:
    """The (prompt, negative) pairs the engine would send for ``reqs``: styles, quality terms
    and default negatives applied, counted with the model's own tokenizer."""

    def count(text: str) -> int:
        ids = pipe.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
        return len(ids["input_ids"])

    styles, blocklist = default_registry(), default_blocklist()
    return [pair for r in reqs for pair in prepare_prompt(r, styles, blocklist, False, count)]


def raw_seconds(pipe: Any, pairs: Sequence[tuple[str, str]], side: int, seed: int = 7) -> float:
    """One pipeline call for ``pairs`` (one image each), as the engine makes it: per-image CPU
    generators, the same steps, guidance, size and output type. Returns seconds."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(pairs))]
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt=[p for p, _ in pairs], negative_prompt=[n for _, n in pairs],
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=side, width=side,
            generator=generators, output_type="pil",
        )
    return time.perf_counter() - start


def _raw_server(conn: Connection, data_dir: str, profile: DeviceProfile,
                models: list[str]) -> None:
    """A plain process making timed raw calls on request: ``(model, requests, side)`` in,
    seconds out; None ends it. Models load first, then "ready" is sent."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    settings = load_settings(data_dir=Path(data_dir), _env_file=None)
    cache = ModelCache(ModelRegistry.load(settings), profile, 8 * 2**30, offline=True)
    for name in models:
        cache.get(name)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        model, reqs, side = message
        pipe = cache.get(model)
        conn.send(raw_seconds(pipe, prepared_prompts(pipe, reqs), side))


class RawProcess:
    """The raw side: pipelines called directly, in a process of their own, as a plain script
    would call them (not in this process, whose malloc state the store's and Redis' threads
    share), started with ``env`` added to its environment (glibc reads malloc settings only
    when a process starts)."""

    def __init__(self, data_dir: Path, profile: DeviceProfile, models: list[str],
                 env: Mapping[str, str] | None = None) -> None:
        import multiprocessing
        import os

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_raw_server, args=(child, str(data_dir), profile, models), daemon=True
        )
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:  # a spawned child gets os.environ as it is when it starts
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()

    def ready(self) -> None:
        if self._conn.recv() != "ready":
            raise RuntimeError("the raw process did not start")

    async def seconds(self, model: str, reqs: Sequence[GenerationRequest], side: int) -> float:
        """Seconds of one raw call making one image per request."""

        def call() -> float:
            self._conn.send((model, list(reqs), side))
            return float(self._conn.recv())

        return await asyncio.to_thread(call)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()


# The benchmarks ---------------------------------------------------------------------------------


def _seeds() -> Callable[[], int]:
    counter = iter(range(10_000, 10**9))
    return lambda: next(counter)


async def bench_p1(stack: Stack, model: str, side: int, reps: int, *, extra: int, goal: bool,
                   out: list[Result]) -> None:
    """P1: one job end to end (submit -> done event) vs the raw call, worker idle; plus the
    Ray worker called directly (no broker, dispatcher or store) to split the overhead, and
    the raw call in a plain process (glibc's default malloc) for what the worker's malloc
    settings gain. Ratios are medians of per-round ratios: the variants of one round run
    back to back, so they share the machine's state of the moment."""
    load = LoadMeter()
    seed = _seeds()

    async def raw() -> float:
        return await stack.raw.seconds(model, [request(model, side, seed=0)], side)

    async def plain() -> float:
        return await stack.plain.seconds(model, [request(model, side, seed=0)], side)

    async def worker() -> float:
        item = BatchItem(f"direct-{uuid.uuid4().hex[:12]}", request(model, side, seed=seed()))
        start = time.perf_counter()
        await run_batch(stack.worker, [item], timeout_s=600)
        return time.perf_counter() - start

    async def pipeline() -> float:
        return (await stack.job(request(model, side, seed=seed()), "p1"))[0]

    async with stack.serving():
        rounds = await alternate(
            {"raw": raw, "worker": worker, "pipeline": pipeline, "plain": plain}, reps,
            extra=extra,
        )
    r, w, p, plain_s = (rounds.med(k) for k in ("raw", "worker", "pipeline", "plain"))
    ratio = rounds.ratio("pipeline", "raw")
    report(out, load=load, result=Result(
        f"P1 e2e/job {model} {side}² {STEPS} st",
        f"pipeline {p:.3f}s vs raw {r:.3f}s, worker alone {w:.3f}s ({rounds.note}, "
        f"{rounds.spread('pipeline', 'raw')}; worker/raw {rounds.ratio('worker', 'raw'):.3f}x)",
        f"{ratio:.3f}x",
        "<= 1.05x" if goal else "(goal is for SD-shaped)",
        ratio <= 1.05 if goal else None,
    ))
    report(out, load=load, result=Result(
        f"P1 vs a plain process {model} {side}²",
        f"pipeline {p:.3f}s vs raw in a plain process {plain_s:.3f}s (malloc gain "
        f"{rounds.ratio('plain', 'raw'):.2f}x)",
        f"{rounds.ratio('pipeline', 'plain'):.3f}x", "(reference)", None,
    ))


async def bench_p2(stack: Stack, model: str, side: int, reps: int, raw_reps: int, *,
                   extra: int, goal_ratio: float = 2.0, goal_share: float | None = None,
                   out: list[Result]) -> None:
    """P2: 8 concurrent single-image jobs from 8 people, batched (max 8 per call) vs served one
    at a time (max 1), next to the raw pipeline's batch-4 vs 4 x batch-1 gain."""
    load = LoadMeter()
    seed = _seeds()
    reqs = [request(model, side, seed=0, prompt=p) for p in PROMPTS]

    async def four_singles() -> float:
        return sum([await stack.raw.seconds(model, [r], side) for r in reqs])

    async def one_batch() -> float:
        return await stack.raw.seconds(model, reqs, side)

    if model == TINY:  # a cheap warm-up; on SD the batch-1 shape is warm from P1 already
        await one_batch()
    raw_rounds = await alternate({"4x1": four_singles, "1x4": one_batch}, raw_reps,
                                 warmup=False, extra=extra)
    raw_gain = raw_rounds.ratio("4x1", "1x4")

    sizes: dict[int, list[list[int]]] = {1: [], BURST: []}

    def burst(max_batch: int) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            async with stack.serving(max_batch_items=max_batch) as dispatcher:
                before = len(dispatcher.batches)
                start = time.perf_counter()
                runs = await asyncio.gather(*(
                    stack.job(request(model, side, seed=seed(), prompt=PROMPTS[i % 4]), f"p2-{i}")
                    for i in range(BURST)
                ))
                took = max(done for _, _, done in runs) - start
                sizes[max_batch].append(
                    [len(b.job_ids) for b in list(dispatcher.batches)[before:]]
                )
            return took

        return run

    rounds = await alternate({"serial": burst(1), "batched": burst(BURST)}, reps, warmup=False,
                             extra=extra)
    serial, batched = rounds.med("serial"), rounds.med("batched")
    gain = rounds.ratio("serial", "batched")
    report(out, load=load, result=Result(
        f"P2 raw batch gain {model} {side}²",
        f"4x batch-1 {raw_rounds.med('4x1'):.3f}s vs batch-4 {raw_rounds.med('1x4'):.3f}s "
        f"({raw_rounds.note})",
        f"{raw_gain:.2f}x", "(reference)", None,
    ))
    shapes = " ".join("+".join(map(str, s)) for s in sizes[BURST])
    label = f"P2 {BURST} concurrent jobs {model} {side}²"
    measured = (f"{BURST / batched:.2f} vs {BURST / serial:.2f} img/s, batches {shapes} "
                f"({rounds.note})")
    if goal_share is None:
        goal, ok = f">= {goal_ratio:.1f}x", gain >= goal_ratio
    else:
        need = goal_share * raw_gain
        goal, ok = f">= {goal_share:.0%} of raw = {need:.2f}x", gain >= need
    report(out, load=load, result=Result(label, measured, f"{gain:.2f}x", goal, ok))
    if goal_share is not None:
        report(out, load=load, result=Result(
            f"P2 share of raw gain {model} {side}²",
            f"pipeline {gain:.2f}x / raw {raw_gain:.2f}x", f"{gain / raw_gain:.0%}",
            f">= {goal_share:.0%}", ok,
        ))


async def bench_p3(stack: Stack, jobs: int, *, gather_window_s: float | None,
                   out: list[Result]) -> None:
    """P3: enqueue (the client's XADD returned) -> "started" (the dispatcher won the job and
    calls the worker) and -> first step done (heard from the worker), one tiny job at a time."""
    load = LoadMeter()
    options = {} if gather_window_s is None else {"gather_window_ms": round(gather_window_s * 1000)}
    started: list[float] = []
    stepped: list[float] = []
    async with stack.serving(**options) as dispatcher, stack.progress_log() as log_:
        window, gap = dispatcher.gather_window_s, dispatcher.gather_gap_s
        for n in range(jobs):
            _, job_id, _ = await stack.job(request(TINY, TINY_SIDE, seed=20_000 + n), "p3")
            enqueued = stack.client_broker.enqueued[job_id]
            started.append(log_.at(job_id, EventKind.started) - enqueued)
            stepped.append(log_.at(job_id, EventKind.progress) - enqueued)
    ms = [1000 * x for x in started]
    ms_step = [1000 * x for x in stepped]
    p99 = percentile(ms, 0.99)
    label = "default" if gather_window_s is None else "gather 0, diag."
    report(out, load=load, result=Result(
        f"P3 enqueue->started ({label})",
        f"p50 {percentile(ms, 0.5):.1f} ms, p99 {p99:.1f} ms (first step done: p50 "
        f"{percentile(ms_step, 0.5):.0f}, p99 {percentile(ms_step, 0.99):.0f} ms)",
        f"{p99:.0f} ms",
        f"p99 <= 50 ms (gap {gap * 1000:g}/{window * 1000:g} ms)",
        p99 <= 50 if gather_window_s is None else None,
    ))


async def bench_p4(stack: Stack, model: str, side: int, reps: int, *, extra: int,
                   out: list[Result]) -> None:
    """P4: one job with four styles vs the same four images as four jobs, one after another
    (time to all four images); and, for reference, the four jobs sent at once."""
    load = LoadMeter()
    seed = _seeds()

    async def styled() -> float:
        req = request(model, side, seed=seed(), styles=STYLES)
        return (await stack.job(req, "p4"))[0]

    async def separate() -> float:
        base = seed()
        runs = [await stack.job(request(model, side, seed=base, styles=(style,)), "p4")
                for style in STYLES]
        return sum(took for took, _, _ in runs)

    async def together() -> float:
        start, base = time.perf_counter(), seed()
        runs = await asyncio.gather(*(
            stack.job(request(model, side, seed=base, styles=(s,)), f"p4-{i}")
            for i, s in enumerate(STYLES)
        ))
        return max(done for _, _, done in runs) - start

    async def raw_styled() -> float:
        return await stack.raw.seconds(model, [request(model, side, seed=0, styles=STYLES)], side)

    async def raw_separate() -> float:
        return sum([await stack.raw.seconds(model, [request(model, side, seed=0, styles=(s,))],
                                            side) for s in STYLES])

    variants = {"styled": styled, "separate": separate, "raw styled": raw_styled,
                "raw separate": raw_separate}
    if model == TINY:
        variants["together"] = together
    async with stack.serving():
        rounds = await alternate(variants, reps, warmup=model == TINY, extra=extra)
    one, four = rounds.med("styled"), rounds.med("separate")
    ratio = rounds.ratio("separate", "styled")
    raw_one, raw_four = rounds.med("raw styled"), rounds.med("raw separate")
    raw_ratio = rounds.ratio("raw separate", "raw styled")
    # The 1.3x goal holds where batching pays (tiny, any GPU); on this CPU the SD-shaped
    # model's own batch-4 gain is ~1.1-1.2x, so there a styled job must keep 90% of what the
    # raw pipeline gains from the same four prompts in one call.
    if model == TINY:
        goal, ok = ">= 1.3x", ratio >= 1.3
    else:
        goal, ok = f">= 90% of raw = {0.9 * raw_ratio:.2f}x", ratio >= 0.9 * raw_ratio
    report(out, load=load, result=Result(
        f"P4 4 styles {model} {side}²",
        f"1 job {one:.3f}s vs 4 jobs in turn {four:.3f}s ({rounds.note})",
        f"{ratio:.2f}x", goal, ok,
    ))
    report(out, load=load, result=Result(
        f"P4 raw 4 styled prompts {model} {side}²",
        f"1 call {raw_one:.3f}s vs 4 calls {raw_four:.3f}s",
        f"{raw_ratio:.2f}x", "(reference)", None,
    ))
    if "together" in rounds.times:
        at_once = rounds.med("together")
        report(out, load=load, result=Result(
            f"P4 4 jobs at once {model} {side}²",
            f"1 job {one:.3f}s vs 4 jobs sent together {at_once:.3f}s",
            f"{at_once / one:.2f}x", "(reference)", None,
        ))


# Main -------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> list[Result]:
    wanted = {p.strip().lower() for p in args.only.split(",")} if args.only else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    sd_path = None if args.quick else ensure_sd15_shaped(args.cache_dir)
    quick = args.quick
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="atelier-bench-") as tmp:
        async with open_stack(Path(tmp) / "data", args.redis_url, sd_path) as stack:
            print(f"stack ready after {time.perf_counter() - STARTED:.0f}s\n", flush=True)
            print(HEADER, flush=True)
            # Tiny rounds take a second or less: noisy ones are run again (up to as many
            # again). SD rounds take 20 s to 2 min: few extra ones fit in the time.
            n = 5 if quick else 7
            if want("p1"):
                await bench_p1(stack, TINY, TINY_SIDE, n, extra=n, goal=False, out=out)
            if want("p2"):
                n = 3 if quick else 5
                await bench_p2(stack, TINY, TINY_SIDE, n, n, extra=n, goal_ratio=2.0, out=out)
            if want("p3"):
                await bench_p3(stack, args.p3_jobs, gather_window_s=None, out=out)
                await bench_p3(stack, args.p3_jobs, gather_window_s=0.0, out=out)
            if want("p4"):
                n = 3 if quick else 5
                await bench_p4(stack, TINY, TINY_SIDE, n, extra=n, out=out)
            if sd_path is not None:
                if want("p1"):
                    await bench_p1(stack, SD, SD_SIDE, 8, extra=2, goal=True, out=out)
                if want("p2"):
                    await bench_p2(stack, SD, SD_SIDE, 2, 2, extra=0, goal_share=0.9, out=out)
                if want("p4") and args.sd_styles:
                    await bench_p4(stack, SD, SD_SIDE, 1, extra=1, out=out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated subset of p1,p2,p3,p4")
    parser.add_argument("--p3-jobs", type=int, default=50, help="jobs per P3 run (default 50)")
    parser.add_argument("--sd-styles", action=argparse.BooleanOptionalAction, default=True,
                        help="P4 on the SD1.5-shaped model too (full mode; ~1 minute)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where the SD1.5-shaped model is kept between runs")
    args = parser.parse_args(argv)
    # Keep the table readable: the stack logs at INFO, Diffusers warns about casts.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    results = asyncio.run(run(args))
    print(f"\nsummary\n{HEADER}")
    for result in results:
        print(result.line())
    print(f"\ntotal {time.perf_counter() - STARTED:.0f}s")


if __name__ == "__main__":
    main()
