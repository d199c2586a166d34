"""Reliability campaign: counted faults under load (a script, not a CI test; its short form is
tests/cluster/test_chaos.py). A private multi-node Ray cluster on loopback (a head and three
worker nodes, a tiny-model worker each), two dispatcher processes, the Telegram bot process
against the fake Bot API, the Discord bot process against the fake Discord, a private Redis
(AOF on and off) and a private PostgreSQL; a steady stream of jobs from many accounts while a
seeded schedule kills workers, removes nodes, kills dispatchers and the bot, restarts and
freezes Redis, crashes PostgreSQL, sends poison jobs, answers 429 for a while and sends
payment updates duplicated and out of order (bench/chaos_payments.py). Then it audits every
job, every charge, the ledger, Redis and memory, and prints a table: faults by kind, jobs by
outcome, violations (must be 0), time to recover per kind.

    .venv/bin/python -m bench.chaos --minutes 30 --faults 300 --seed 1 [--rate 1.5]

Exit status 1 when there are violations. Needs redis-server and PostgreSQL's server binaries
(/usr/lib/postgresql/*/bin); about 3 GB of memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "warning")

from bench.chaos_audit import Report, audit
from bench.chaos_faults import Injector, run_schedule, schedule, supervise
from bench.chaos_load import TOKEN, ChaosTelegram, Load
from bench.chaos_payments import SHOP_TOML, DiscordBot, Payments
from bench.chaos_services import ROOT, Postgres, Process, RayNodes, Redis

log = logging.getLogger("chaos")

CLAIM_MS = 3000
DISPATCH = {
    "CLAIM_TIMEOUT_MS": CLAIM_MS, "WORKER_LEASE_S": 2, "JOB_TIMEOUT_S": 60, "MAX_ATTEMPTS": 3,
    "REDELIVER_GRACE_S": 5, "GATHER_WINDOW_MS": 50, "MAX_BATCH_ITEMS": 4,
}


TIERS = {"chaos": {"daily_allowance": 100_000, "concurrency": 50, "max_side": 1024}}


@dataclasses.dataclass
class Config:
    seconds: float = 120
    faults: int = 20
    seed: int = 1
    rate: float = 1.0  # jobs a second
    users: int = 24
    nodes: int = 3
    drain_s: float = 120
    keep: bool = False  # keep the temp dir (logs) even without violations


def _models(data: Path) -> Path:
    """The tiny models, and a models file that adds "tiny-broken" (corrupt UNet weights: every
    worker fails to load it, so its jobs are poison) and makes "tiny" the default."""
    from engine.tiny import make_tiny_models

    paths = make_tiny_models(data / "models", seed=0)
    broken = data / "tiny-broken"
    shutil.copytree(paths["sd15"], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    models_file = data / "models.toml"
    models_file.write_text(
        'default = "tiny"\n\n[models.tiny-broken]\n'
        f'path = "{broken}"\nfamily = "sd15"\nmin_vram_gb = 0\nmax_steps = 50\n'
        'scheduler = "Euler"\n'
    )
    return models_file


def _profile() -> Any:
    from engine.devices import DeviceInfo, choose_profile

    info = DeviceInfo(kind="cpu", name="chaos CPU", total_memory=16 * 2**30, cores=1,
                      logical_cpus=1)
    return dataclasses.replace(choose_profile(info, "sd15"), threads=1)


def _env(data: Path, models_file: Path, db_url: str, redis_url: str, fake: ChaosTelegram,
         discord: Any) -> dict[str, str]:
    from ray._private import ray_constants

    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env |= {
        "ATELIER_DATA_DIR": str(data), "ATELIER_MODELS_FILE": str(models_file),
        "ATELIER_DATABASE_URL": db_url, "ATELIER_REDIS_URL": redis_url,
        "ATELIER_TELEGRAM_TOKEN": TOKEN, "ATELIER_TELEGRAM_API_BASE_URL": fake.base_url,
        "ATELIER_TELEGRAM_FILE_BASE_URL": fake.base_file_url,
        "ATELIER_DISCORD_TOKEN": discord.token, "ATELIER_DISCORD_API_BASE_URL": discord.api_base,
        "ATELIER_DISCORD_GATEWAY_URL": discord.gateway_url,
        "ATELIER_PUBLIC_BASE_URL": "https://atelier.example", "ATELIER_SIGNING_KEY": "k" * 40,
        "ATELIER_DEFAULT_TIER": "chaos",
        "ATELIER_TIERS": json.dumps(TIERS),
        "PYTHONPATH": str(ROOT), ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0",
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
    }
    env |= {f"ATELIER_DISPATCH__{k}": str(v) for k, v in DISPATCH.items()}
    return env


async def _sample_memory(nodes: RayNodes, dispatchers: list[Process],
                         memory: dict[str, list[tuple[float, int]]], stop: asyncio.Event) -> None:
    import psutil  # type: ignore[import-untyped]

    while not stop.is_set():
        pids = {f"{d.role}:{d.pid}": d.pid for d in dispatchers if d.pid is not None}
        pids |= {f"worker:{w.pid}": w.pid for w in list(nodes.workers.values())}
        for key, pid in pids.items():
            with contextlib.suppress(psutil.Error):
                memory.setdefault(key, []).append(
                    (time.monotonic(), psutil.Process(pid).memory_info().rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5)


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.5)


async def _drained(db_url: str, fake: ChaosTelegram) -> bool:
    """Every job finished and marked delivered (its result reached the chat)."""
    from sqlalchemy import text

    from storage.db import make_engine

    def look() -> bool:
        engine = make_engine(db_url)
        try:
            with engine.connect() as conn:
                left = conn.execute(text(
                    "select count(*) from jobs where status not in "
                    "('succeeded', 'failed', 'cancelled') or delivered_at is null")).scalar()
        finally:
            engine.dispose()
        return left == 0

    try:
        return await asyncio.to_thread(look)
    except Exception:
        return False


async def campaign(cfg: Config, root: Path) -> Report:
    """Run one campaign with its services under ``root``; returns the audit's report."""
    from storage.db import make_engine, session_factory, upgrade

    data = root / "data"
    logs = root / "logs"
    logs.mkdir(parents=True)
    models_file = await asyncio.to_thread(_models, data)
    from core.settings import load_settings

    worker_settings = load_settings(data_dir=data, models_file=models_file,
                                    _env_file=None).worker_config()
    from testing.discord.server import TOKEN as DISCORD_TOKEN
    from testing.discord.server import FakeDiscord

    (data / "shop.toml").write_text(SHOP_TOML)  # both bots sell its packs (payment faults)
    pg = Postgres(root)
    redis = Redis(root)
    fake = ChaosTelegram(TOKEN)
    discord_fake = FakeDiscord(DISCORD_TOKEN)
    nodes: RayNodes | None = None
    dispatchers: list[Process] = []
    bot: Process | None = None
    discord: Process | None = None
    payments: Payments | None = None
    pay_engine: Any = None
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(pg.init)
        await asyncio.to_thread(upgrade, pg.url)
        redis.start(aof=False)
        await fake.start()
        await discord_fake.start()
        nodes = RayNodes(cfg.nodes, worker_settings, _profile())  # main thread: signals
        env = _env(data, models_file, pg.url, redis.url, fake, discord_fake)
        dispatchers = [Process(f"d{n}", env, logs, "dispatcher", f"chaos-d{n}", nodes.address)
                       for n in (1, 2)]
        bot = Process("bot", env, logs, "bot")
        discord = Process("discord", env, logs, "discord")
        load = Load(fake, rate=cfg.rate, users=cfg.users, seed=cfg.seed)
        faults = schedule(cfg.seed, cfg.faults, 0.05 * cfg.seconds, 0.9 * cfg.seconds)
        memory: dict[str, list[tuple[float, int]]] = {}
        await asyncio.gather(*(asyncio.to_thread(nodes.spawn, i) for i in range(cfg.nodes)))
        for d in dispatchers:
            d.start()
        bot.start()
        discord.start()
        # Warm up: one job through everything before the clock starts.
        await load.one()
        await _until(lambda: _photo(fake), 300, "the first photo (warm-up)")
        log.info("warm; load %.1f jobs/s for %.0f s with %d faults", cfg.rate, cfg.seconds,
                 cfg.faults)
        await discord_fake.wait_for(lambda: discord_fake.identifies > 0, 300,
                                    "the Discord bot connected")
        injector = Injector(redis=redis, pg=pg, nodes=nodes, dispatchers=dispatchers, bot=bot,
                            fake=fake, load=load)
        pay_engine = make_engine(pg.url)
        payments = Payments(
            load_settings(data_dir=data, tiers=TIERS, default_tier="chaos", _env_file=None),
            fake, discord_fake, _discord_bot(discord, injector),
            sessions=session_factory(pay_engine),
        )
        injector.payments = payments
        start = time.monotonic()
        restarts: dict[str, int] = {}
        done = asyncio.Event()
        supervisor = asyncio.create_task(
            supervise([*dispatchers, bot, discord], injector, done, restarts))
        sampler = asyncio.create_task(_sample_memory(nodes, dispatchers, memory, stop))
        loading = asyncio.create_task(load.run(stop))
        chaos = asyncio.create_task(run_schedule(faults, injector, start, stop))
        await asyncio.sleep(cfg.seconds)
        stop.set()
        await loading
        await chaos  # every fault healed
        log.info("load stopped after %.0f s; draining", time.monotonic() - start)
        await payments.settle(cfg.drain_s)
        try:
            await _until(lambda: _drained(pg.url, fake), cfg.drain_s, "every job to finish")
        except RuntimeError as exc:  # the audit names what is stuck
            log.error("%s", exc)
        # Past the claim timeout, so any entry still pending is one nobody will take over.
        await asyncio.sleep(CLAIM_MS / 1000 * 2)
        sampler.cancel()
        done.set()
        await supervisor
        report = await asyncio.to_thread(
            audit, db_url=pg.url, redis_url=redis.url, claim_ms=CLAIM_MS, sent=load.sent,
            photos=fake.photos, faults=faults, memory=memory,
            seeds={"faults": cfg.seed, "load": cfg.seed}, duration_s=cfg.seconds,
        )
        report.violations += await asyncio.to_thread(payments.audit)
        report.notes.append("payment charges by scenario: " + ", ".join(
            f"{k} {v}" for k, v in sorted(payments.counts().items())))
        report.notes.append(f"429 answers in storms: {fake.storm_refusals}")
        report.notes.append(f"processes that exited by themselves, restarted: {restarts}")
        report.notes.append(f"logs under {logs}")
        return report
    finally:
        stop.set()
        if bot is not None:
            bot.stop()
        if discord is not None:
            discord.stop()
        if pay_engine is not None:
            pay_engine.dispose()
        await discord_fake.stop()
        for d in dispatchers:
            d.stop()
        await fake.stop()
        if nodes is not None:
            nodes.shutdown()
        redis.kill()
        await asyncio.to_thread(pg.remove)


def _discord_bot(proc: Process, injector: Injector) -> DiscordBot:
    """The Discord bot process, taken away and brought back by a payment fault (marked as
    healing meanwhile, so the supervisor leaves it to the fault)."""

    async def down() -> None:
        injector.healing.add(proc.role)
        await asyncio.to_thread(proc.kill)

    async def up() -> None:
        proc.start()
        injector.healing.discard(proc.role)

    return DiscordBot(down=down, up=up)


async def _photo(fake: ChaosTelegram) -> bool:
    return bool(fake.photos)


def run(cfg: Config) -> Report:
    root = Path(tempfile.mkdtemp(prefix="atelier-chaos-"))
    ok = False
    try:
        report = asyncio.run(campaign(cfg, root))
        ok = not report.violations
        return report
    finally:
        if ok and not cfg.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=1.0, help="jobs a second")
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and logs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ray", "httpx", "telegram", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = Config(seconds=args.minutes * 60, faults=args.faults, seed=args.seed,
                 rate=args.rate, users=args.users, keep=args.keep)
    report = run(cfg)
    print(report.table(), flush=True)
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
