"""The chaos campaign's faults: a seeded schedule (every kind, round-robin in shuffled rounds, at
uniformly random moments), and the injector that causes each one and then heals what it broke
(a process restarted, a node added back, Redis resumed) after a short random outage."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.chaos_load import ChaosTelegram, Load
    from bench.chaos_payments import Payments
    from bench.chaos_services import Postgres, Process, RayNodes, Redis

log = logging.getLogger("chaos")

KINDS = (
    "worker_kill", "node_remove", "dispatcher_kill", "bot_kill", "redis_restart",
    "redis_restart_aof", "redis_pause", "pg_restart", "poison_job", "storm_429", "payment",
)


@dataclasses.dataclass
class Fault:
    kind: str
    at_s: float  # planned, from the start of the load
    x: float  # a random number in [0, 1) the injector draws its choices from
    injected: float | None = None  # monotonic time it happened
    healed: float | None = None  # monotonic time what it broke was back
    detail: str = ""


def schedule(seed: int, n: int, start_s: float, end_s: float) -> list[Fault]:
    """``n`` faults between ``start_s`` and ``end_s``: every kind once per round, in a
    shuffled order, at sorted uniformly random moments."""
    rng = random.Random(seed)
    kinds: list[str] = []
    while len(kinds) < n:
        round_ = list(KINDS)
        rng.shuffle(round_)
        kinds += round_
    times = sorted(rng.uniform(start_s, end_s) for _ in range(n))
    return [Fault(k, t, rng.random()) for k, t in zip(kinds[:n], times, strict=True)]


class Injector:
    """Causes faults on the campaign's services and heals them. One task per fault; a fault
    waits for a target that is up (e.g. a dispatcher not already down) before it strikes."""

    def __init__(
        self, *, redis: Redis, pg: Postgres, nodes: RayNodes, dispatchers: list[Process],
        bot: Process, fake: ChaosTelegram, load: Load, payments: Payments | None = None,
    ) -> None:
        self.redis, self.pg, self.nodes = redis, pg, nodes
        self.dispatchers, self.bot, self.fake, self.load = dispatchers, bot, fake, load
        self.payments = payments
        self.healing: set[str] = set()  # targets down now, being brought back
        self.redis_lock = asyncio.Lock()
        self.pg_lock = asyncio.Lock()

    async def _target(self, options: Callable[[], list[str]], x: float, wait_s: float = 120
                      ) -> str:
        deadline = time.monotonic() + wait_s
        while True:
            free = sorted(t for t in options() if t not in self.healing)
            if free:
                target = free[int(x * len(free))]
                self.healing.add(target)
                return target
            if time.monotonic() > deadline:
                raise RuntimeError("no target came back up to strike")
            await asyncio.sleep(0.2)

    async def inject(self, f: Fault) -> None:
        rng = random.Random(f.x)
        try:
            await getattr(self, f"_{f.kind}")(f, rng)
        except Exception as exc:  # a fault that could not be caused is reported, not fatal
            log.exception("fault %s failed", f.kind)
            f.detail += f" FAILED: {exc!r}"

    def _strike(self, f: Fault, detail: str) -> None:
        f.injected = time.monotonic()
        f.detail = detail
        log.info("fault %s: %s", f.kind, detail)

    def _healed(self, f: Fault, target: str | None = None) -> None:
        f.healed = time.monotonic()
        if target is not None:
            self.healing.discard(target)

    async def _worker_kill(self, f: Fault, rng: random.Random) -> None:
        target = await self._target(lambda: [f"node{i}" for i in self.nodes.workers], f.x)
        i = int(target.removeprefix("node"))
        pid = self.nodes.workers[i].pid
        await asyncio.to_thread(self.nodes.kill_worker, i)
        self._strike(f, f"SIGKILL worker on node {i} (pid {pid})")
        await asyncio.sleep(rng.uniform(0.5, 3))
        await asyncio.to_thread(self.nodes.heal, i)
        self._healed(f, target)

    async def _node_remove(self, f: Fault, rng: random.Random) -> None:
        # Never the last node standing: two of three are candidates at most.
        def candidates() -> list[str]:
            up = [f"node{i}" for i in self.nodes.nodes if f"node{i}" not in self.healing]
            return up if len(up) >= 2 else []

        target = await self._target(candidates, f.x)
        i = int(target.removeprefix("node"))
        await asyncio.to_thread(self.nodes.remove_node, i)
        self._strike(f, f"removed node {i}")
        await asyncio.sleep(rng.uniform(2, 6))
        self.nodes.add_node(i)  # on the loop's (main) thread: Ray sets signal handlers
        await asyncio.to_thread(self.nodes.heal, i)
        self._healed(f, target)

    async def _dispatcher_kill(self, f: Fault, rng: random.Random) -> None:
        target = await self._target(
            lambda: [d.role for d in self.dispatchers if d.alive], f.x)
        proc = next(d for d in self.dispatchers if d.role == target)
        await asyncio.to_thread(proc.kill)
        self._strike(f, f"SIGKILL {target}")
        await asyncio.sleep(rng.uniform(0.5, 4))
        proc.start()
        self._healed(f, target)

    async def _bot_kill(self, f: Fault, rng: random.Random) -> None:
        target = await self._target(lambda: ["bot"] if self.bot.alive else [], f.x)
        await asyncio.to_thread(self.bot.kill)
        self._strike(f, "SIGKILL the bot")
        await asyncio.sleep(rng.uniform(0.5, 3))
        self.bot.start()
        self._healed(f, target)

    async def _restart_redis(self, f: Fault, rng: random.Random, aof: bool) -> None:
        async with self.redis_lock:
            await asyncio.to_thread(self.redis.kill)
            self._strike(f, f"SIGKILL redis; back with AOF {'on' if aof else 'off'}")
            await asyncio.sleep(rng.uniform(0, 2))
            await asyncio.to_thread(self.redis.start, aof=aof)
            self._healed(f)

    async def _redis_restart(self, f: Fault, rng: random.Random) -> None:
        await self._restart_redis(f, rng, aof=False)

    async def _redis_restart_aof(self, f: Fault, rng: random.Random) -> None:
        # Restarted with AOF on: what it had since the last restart with AOF on comes back
        # (up to its last second); the first such restart after one with AOF off loses all.
        await self._restart_redis(f, rng, aof=True)

    async def _redis_pause(self, f: Fault, rng: random.Random) -> None:
        async with self.redis_lock:
            seconds = rng.uniform(2, 8)
            self.redis.pause()
            self._strike(f, f"SIGSTOP redis for {seconds:.1f} s")
            await asyncio.sleep(seconds)
            self.redis.resume()
            self._healed(f)

    async def _pg_restart(self, f: Fault, rng: random.Random) -> None:
        async with self.pg_lock:
            self._strike(f, "PostgreSQL crash (pg_ctl -m immediate) and start")
            await asyncio.to_thread(self.pg.crash_restart)
            self._healed(f)

    async def _poison_job(self, f: Fault, rng: random.Random) -> None:
        sent = await self.load.poison()
        self._strike(f, f"poison job from user {sent.user} (message {sent.message_id})")
        self._healed(f)

    async def _payment(self, f: Fault, rng: random.Random) -> None:
        # Payment updates duplicated and out of order (bench/chaos_payments.py); healed when
        # every event is sent (the audit waits for the bots to record them).
        if self.payments is None:
            raise RuntimeError("the campaign runs no payments")
        f.injected = time.monotonic()
        log.info("fault payment: duplicated and reordered payment updates")
        f.detail = await self.payments.fault(f.x)
        self._healed(f)

    async def _storm_429(self, f: Fault, rng: random.Random) -> None:
        seconds, retry_after = rng.uniform(3, 10), rng.randint(1, 3)
        self.fake.storm(seconds, retry_after)
        self._strike(f, f"429 to every call for {seconds:.1f} s (retry_after {retry_after})")
        await asyncio.sleep(seconds)
        self._healed(f)


async def run_schedule(faults: list[Fault], injector: Injector, start: float,
                       stop: asyncio.Event) -> None:
    """Inject each fault at its moment (a task each), then wait for every one to heal."""
    tasks = []
    for f in faults:
        delay = start + f.at_s - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break  # stopped early
            except TimeoutError:
                pass
        tasks.append(asyncio.create_task(injector.inject(f)))
    if tasks:
        await asyncio.gather(*tasks)


async def supervise(procs: list[Process], injector: Injector, stop: asyncio.Event,
                    restarts: dict[str, int]) -> None:
    """Restart a process that exited by itself, as systemd or Kubernetes would (one that
    starts while Redis or PostgreSQL is down gives up: it is not retried in-process); those
    a fault took down are the injector's to bring back."""
    while not stop.is_set():
        for p in procs:
            if p.proc is not None and not p.alive and p.role not in injector.healing:
                log.warning("%s exited by itself (%s); restarting", p.role, p.proc.returncode)
                restarts[p.role] = restarts.get(p.role, 0) + 1
                p.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)
