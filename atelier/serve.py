"""CLI commands that run the service: up, bot (telegram, discord), imagine, dispatcher, worker."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import signal
import socket
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from atelier.service import Stack, local_profiles, local_stack
from atelier.webserver import serve_web, web_lines
from atelier.wiring import (
    console,
    err_console,
    fail,
    quiet_ml_libraries,
    settings_or_exit,
)
from core.errors import AtelierError
from core.jobs import DeliveryTarget, Requester
from core.logs import setup_logging
from core.redact import redact_url
from core.settings import Settings

if TYPE_CHECKING:
    from cluster.client import Client
    from cluster.registry import ModelRegistry

Stopper = Callable[[], Awaitable[None]]


def up() -> None:
    """Run the single-box service: Ray on 127.0.0.1 with a worker per local device, the
    dispatcher, and every bot that has a token configured. Ctrl-C stops it."""
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_up(settings))
    except AtelierError as exc:
        raise fail(exc) from None


def bot_telegram() -> None:
    """Run the Telegram bot as a process of its own, over the shared Redis and database (the
    dispatchers and workers run elsewhere). Long polling, or a webhook when
    ATELIER_TELEGRAM_WEBHOOK_URL is set. `atelier up` runs it in-process instead."""
    from atelier.service import run_telegram_bot
    from core.errors import ConfigError

    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run_telegram_bot(settings))
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None
    except AtelierError as exc:
        raise fail(exc) from None


def bot_discord(
    sync: bool = typer.Option(
        False, "--sync",
        help="register the slash commands with Discord first (with --guild: in that server, "
        "at once; without: globally, which Discord rate-limits to 200 creations a day)",
    ),
    guild: int | None = typer.Option(None, "--guild", help="server id for --sync"),
) -> None:
    """Run the Discord bot as a process of its own, over the shared Redis and database (the
    dispatchers and workers run elsewhere). `atelier up` runs it in-process instead."""
    from atelier.service import run_discord_bot
    from core.errors import ConfigError

    if guild is not None and not sync:
        err_console.print("[red]error:[/red] --guild only goes with --sync")
        raise typer.Exit(2)
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run_discord_bot(settings, sync=sync, guild_id=guild))
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None
    except AtelierError as exc:
        raise fail(exc) from None


def imagine(
    prompt: str = typer.Argument(..., help='prompt and flags: "a fox --style anime --n 2"'),
    out: Path = typer.Option(Path("."), help="folder for the PNGs"),
    model: str | None = typer.Option(None, help="model name (see `atelier models list`)"),
    nsfw: bool = typer.Option(False, help="allow NSFW prompts (the operator's own call)"),
    via_queue: bool = typer.Option(
        False, "--via-queue",
        help="submit to the running service (`atelier up` or dispatchers) over "
        "ATELIER_REDIS_URL instead of starting workers in this process",
    ),
) -> None:
    """Generate images through the same client, queue and dispatcher the bots use."""
    settings = settings_or_exit()
    if via_queue and settings.redis_url is None:
        err_console.print(
            "[red]error:[/red] --via-queue needs ATELIER_REDIS_URL, the Redis the service uses"
        )
        raise typer.Exit(2)
    quiet_ml_libraries()
    try:
        paths = asyncio.run(_imagine(settings, prompt, out, model, nsfw, via_queue=via_queue))
    except AtelierError as exc:
        raise fail(exc) from None
    if not paths:
        raise typer.Exit(1)


def dispatcher(
    name: str = typer.Option(..., help="consumer name, unique per dispatcher"),
    ray_address: str = typer.Option("auto", help="Ray cluster address"),
) -> None:
    """Run one dispatcher process (needs ATELIER_REDIS_URL, a migrated database and a Ray
    cluster whose workers were started by `atelier worker`)."""
    from atelier.service import run_dispatcher

    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run_dispatcher(settings, name=name, ray_address=ray_address))
    except AtelierError as exc:
        raise fail(exc) from None


def worker(
    address: str = typer.Option(..., help="the Ray head's address, e.g. 10.0.0.5:6380"),
    node_ip: str | None = typer.Option(None, help="this node's IP as the head sees it"),
) -> None:
    """Join this box to a Ray cluster and start a worker actor per local device."""
    _worker(settings_or_exit(), address, node_ip)


def jobs() -> None:
    """Queue depth, running jobs and dead letters."""
    settings = settings_or_exit()
    try:
        asyncio.run(_jobs(settings))
    except AtelierError as exc:
        raise fail(exc) from None


async def _up(settings: Settings) -> None:
    con = console
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A stable dispatcher name: restarted after a crash, it takes back its jobs in flight at once.
    name = f"{socket.gethostname()}-up"
    async with local_stack(settings, dispatcher_name=name) as stack, serve_web(stack) as web_url:
        con.print("[bold]Atelier is up[/bold]")
        for line in web_lines(settings, web_url):
            con.print(f"  {line}")
        for note in stack.notes:
            con.print(f"  {note}")
        con.print(f"  database: {redact_url(settings.db_url)}")
        con.print(f"  data dir: {settings.data_dir}")
        con.print("  models:")
        for line in model_lines(stack.client.models):
            con.print(f"    {line}", markup=False)
        for line in await default_model_lines(stack.client):
            con.print(f"  {line}", markup=False)
        available = await stack.client.runnable.available()
        default = await stack.client.runnable.default()
        # The hint names a model that runs here when the default does not.
        pick = "" if default in available or not available else f" --model {available[0]}"
        example = DEMO_EXAMPLE if default == "demo" and not pick else "a red fox --style watercolor"
        bots = await _start_bots(settings, stack)
        con.print(
            "  bots: "
            + (
                ", ".join(name for name, _ in bots)
                or "none (set ATELIER_TELEGRAM_TOKEN or ATELIER_DISCORD_TOKEN to run a bot)"
            )
        )
        con.print(f'Ctrl-C stops it. Try: atelier imagine "{example}"{pick}', markup=False)
        try:
            await stop.wait()
        finally:
            for _, stopper in bots:
                await stopper()


DEMO_EXAMPLE = "a red circle to the left of a yellow star on a blue background"


async def default_model_lines(client: Client) -> list[str]:
    """Which model a prompt naming none gets, and why when it is not the configured one."""
    from cluster.availability import model_availability

    configured, chosen = client.models.default, await client.runnable.default()
    if chosen == configured:
        return [f"default model: {chosen}"]
    why = model_availability(client.models.get(configured)).why or "no worker can load it"
    return [
        f"default model: {chosen}, since the configured default {configured} is not available "
        f"({why})",
        f"  {chosen}: {client.models.get(chosen).description}",
        "  get the configured one (atelier models list says how), or set `default` in your "
        "models.toml",
    ]


def model_lines(models: ModelRegistry) -> list[str]:
    """Each model's availability here, one line each (how to get the missing ones)."""
    from cluster.availability import registry_availability

    return [a.line() for a in registry_availability(models).values()]


async def _start_bots(settings: Settings, stack: Stack) -> list[tuple[str, Stopper]]:
    """Start each configured bot over the in-process stack; return (name, async stop) pairs.
    A bot that cannot start (a refused token, say) stops `atelier up` with its one-line error."""
    started: list[tuple[str, Stopper]] = []
    if settings.telegram_token is not None:
        from bots.telegram.run import start_bot

        bot = await start_bot(settings, stack.client, stack.broker)
        started.append((f"telegram (@{bot.username})", bot.stop))
    if settings.discord_token is not None:
        from bots.discord.run import start_bot as start_discord

        try:
            discord_bot = await start_discord(settings, stack.client, stack.broker)
        except BaseException:
            for _, stopper in started:
                await stopper()
            raise
        started.append((f"discord ({discord_bot.username})", discord_bot.stop))
    return started


async def _imagine(
    settings: Settings, text: str, out: Path, model: str | None, nsfw: bool,
    *, via_queue: bool = False,
) -> list[Path]:
    from core.flags import parse_command

    con = console
    request = parse_command(text)
    if model is not None:
        request = request.model_copy(update={"model": model})
    requester = Requester(platform="cli", platform_user_id=getpass.getuser(), nsfw_allowed=nsfw)
    out.mkdir(parents=True, exist_ok=True)
    from cluster.broker import BrokerUnavailable

    async with local_stack(settings, dispatcher=not via_queue, workers=not via_queue) as stack:
        if via_queue and stack.broker.kind != "redis":
            raise BrokerUnavailable(
                f"Redis at {redact_url(settings.redis_url or '')} does not answer: "
                "is `atelier up` running with the same ATELIER_REDIS_URL?"
            )
        client = stack.client
        quote = await client.jobs.admit(request, requester, f"cli:{uuid.uuid4()}")
        request = quote.request
        job = await client.jobs.submit(quote, DeliveryTarget(frontend="cli"))
        con.print(f"job {job.job_id}: {job.images_out} image(s) of model {request.model}, "
                  f"{job.cost} credit(s)")
        paths: list[Path] = []
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[s]}"),
            TimeElapsedColumn(),
            console=con,
            transient=False,
        ) as bar:
            task = bar.add_task("queued", total=None, s="")
            async for ev in client.jobs.events(job.job_id):
                if ev.kind == "queued":
                    bar.update(task, description="queued", s=f"position {ev.position or '?'}")
                elif ev.kind == "started":
                    bar.update(task, description="rendering", s="")
                elif ev.kind == "progress" and ev.total:
                    bar.update(
                        task,
                        description="rendering",
                        total=ev.total,
                        completed=ev.step,
                        s=f"step {ev.step}/{ev.total}",
                    )
                elif ev.kind == "done":
                    bar.update(
                        task,
                        description="done",
                        completed=bar.tasks[0].total or 1,
                        total=bar.tasks[0].total or 1,
                        s="",
                    )
                    for ref in ev.images:
                        path = out / f"{job.job_id[:8]}-{ref.index}-{ref.seed}.png"
                        path.write_bytes(await client.jobs.image_bytes(ref))
                        paths.append(path)
                else:
                    bar.update(task, description=ev.kind, s="")
                    con.print(f"[red]{ev.kind}:[/red] {ev.reason}")
        with contextlib.suppress(AtelierError):  # Conflict: it did not finish (interrupted)
            await client.jobs.mark_delivered(job.job_id)  # the files are written: no re-announcing
        await _ack_own_delivery(stack.broker, job.job_id)
    for ref_path in paths:
        seed = ref_path.stem.rsplit("-", 1)[-1]
        con.print(f"{ref_path}  seed {seed}")
    return paths


async def _ack_own_delivery(broker: object, job_id: str) -> None:
    """The CLI is the front end of its own jobs: take its delivery off the `cli` stream."""
    from cluster.broker import Broker

    b: Broker = broker  # type: ignore[assignment]
    consumer = f"cli-{uuid.uuid4().hex[:8]}"
    for _ in range(10):
        entries = await b.read_deliveries("cli", consumer, count=50, block_ms=200)
        entries += await b.claim_stale_deliveries("cli", consumer, min_idle_ms=60_000, count=50)
        for entry in entries:
            if entry.event.get("job_id") == job_id:
                await b.ack_delivery("cli", entry.entry_id)
                return


def _worker(settings: Settings, address: str, node_ip: str | None) -> None:
    import ray
    from rich.console import Console

    from atelier.service import device_resources
    from cluster.dispatcher import RAY_NAMESPACE, WORKER_NAME_PREFIX
    from cluster.worker import spawn_worker

    con: Console = console  # type: ignore[assignment]
    profiles = local_profiles()
    resources = device_resources(profiles)
    cmd = ["ray", "start", f"--address={address}", f"--resources={json.dumps(resources)}"]
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    con.print("joining the Ray cluster: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    ray.init(address="auto", namespace=RAY_NAMESPACE, log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for n, profile in enumerate(profiles):
        name = f"{WORKER_NAME_PREFIX}-{node_id[:8]}-{n}"
        spawn_worker(
            settings=settings.worker_config(),
            profile=profile,
            name=name,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        )
        con.print(f"worker {name}: {profile.device_class}")
    con.print("workers run detached on this node; `ray stop` here removes them")


async def _jobs(settings: Settings) -> None:
    from rich.table import Table

    from atelier.service import open_broker

    con = console
    broker = await open_broker(settings, shared=True) if settings.redis_url else None
    table = Table(show_header=False)
    if broker is None:
        con.print("no ATELIER_REDIS_URL: the single-box queue lives inside `atelier up`")
    else:
        try:
            table.add_row("queued (not yet read)", str(await broker.queue_depth()))
            table.add_row("read, not finished", str(await broker.pending_count()))
            dead = await broker.dead_letters(10)
            table.add_row("dead letters", str(len(dead)))
            for d in dead:
                table.add_row(f"  {d.get('job_id')}", d.get("reason", ""))
        finally:
            await broker.close()
    from sqlmodel import func, select

    from atelier.wiring import open_store
    from storage.models import Job

    with open_store(settings) as tx, tx() as session:
        rows = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    for status, n in rows:
        table.add_row(f"jobs {status}", str(n))
    con.print(table)


def main(argv: list[str] | None = None) -> None:
    """``python -m atelier.serve --name d1``: one dispatcher process (settings from the
    ``ATELIER_*`` environment), what `atelier dispatcher` runs, with two more knobs for tests."""
    import argparse

    from atelier.service import run_dispatcher
    from cluster.dispatcher import WORKER_NAME_PREFIX
    from core.settings import load_settings

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--name", default=None, help="consumer name (default: host-pid)")
    parser.add_argument("--ray-address", default="auto")
    parser.add_argument("--claim-idle-ms", type=int, default=None)
    parser.add_argument("--worker-prefix", default=WORKER_NAME_PREFIX)
    args = parser.parse_args(argv)
    settings = load_settings()
    setup_logging(settings.log_format, settings.log_level)
    asyncio.run(
        run_dispatcher(
            settings, name=args.name, ray_address=args.ray_address,
            claim_idle_ms=args.claim_idle_ms, worker_prefix=args.worker_prefix,
        )
    )


if __name__ == "__main__":
    main()
