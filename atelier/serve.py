"""CLI commands that run the service: up, web, bot (telegram, discord), imagine, dispatcher,
worker, jobs. They parse, call the composition root (atelier/app.py) and print."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from atelier import app as root
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
    from core.errors import ConfigError

    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(root.run_telegram_bot(settings))
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
    from core.errors import ConfigError

    if guild is not None and not sync:
        err_console.print("[red]error:[/red] --guild only goes with --sync")
        raise typer.Exit(2)
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(root.run_discord_bot(settings, sync=sync, guild_id=guild))
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
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(root.run_dispatcher(settings, name=name, ray_address=ray_address))
    except AtelierError as exc:
        raise fail(exc) from None


def worker(
    address: str = typer.Option(..., help="the Ray head's address, e.g. 10.0.0.5:6380"),
    node_ip: str | None = typer.Option(None, help="this node's IP as the head sees it"),
) -> None:
    """Join this box to a Ray cluster and start a worker actor per local device."""
    root.join_worker(settings_or_exit(), address, node_ip, say=console.print)
    console.print("workers run detached on this node; `ray stop` here removes them")


def jobs() -> None:
    """Queue depth, running jobs and dead letters."""
    settings = settings_or_exit()
    try:
        asyncio.run(_jobs(settings))
    except AtelierError as exc:
        raise fail(exc) from None


async def _up(settings: Settings) -> None:
    con = console

    async def ready(stack: root.Stack, web_url: str) -> None:
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
        hint.append(f'Ctrl-C stops it. Try: atelier imagine "{example}"{pick}')

    def bots_ready(names: list[str]) -> None:
        con.print(
            "  bots: "
            + (
                ", ".join(names)
                or "none (set ATELIER_TELEGRAM_TOKEN or ATELIER_DISCORD_TOKEN to run a bot)"
            )
        )
        for line in hint:
            con.print(line, markup=False)

    hint: list[str] = []
    await root.run_up(settings, ready=ready, bots_ready=bots_ready)


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

    async with root.local_stack(
        settings, dispatcher=not via_queue, workers=not via_queue
    ) as stack:
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
        entries = await b.deliveries.read_deliveries("cli", consumer, count=50, block_ms=200)
        entries += await b.deliveries.claim_stale_deliveries(
            "cli", consumer, min_idle_ms=60_000, count=50
        )
        for entry in entries:
            if entry.event.get("job_id") == job_id:
                await b.deliveries.ack_delivery("cli", entry.entry_id)
                return


async def _jobs(settings: Settings) -> None:
    from rich.table import Table
    from sqlmodel import func, select

    from storage.models import Job

    con = console
    stats = await root.queue_stats(settings)
    table = Table(show_header=False)
    if stats is None:
        con.print("no ATELIER_REDIS_URL: the single-box queue lives inside `atelier up`")
    else:
        table.add_row("queued (not yet read)", str(stats["queued"]))
        table.add_row("read, not finished", str(stats["pending"]))
        table.add_row("dead letters", str(len(stats["dead"])))
        for d in stats["dead"]:
            table.add_row(f"  {d.get('job_id')}", d.get("reason", ""))
    with root.open_store(settings) as tx, tx() as session:
        rows = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    for status, n in rows:
        table.add_row(f"jobs {status}", str(n))
    con.print(table)


def web() -> None:
    """Run the web app (gallery and APIs) on its own, over the shared Redis and database (the
    dispatchers and workers run elsewhere). `atelier up` serves it in-process instead."""
    settings = settings_or_exit()
    setup_logging(settings.log_format, settings.log_level)

    def ready(url: str) -> None:
        console.print("[bold]Atelier web is up[/bold]")
        for line in web_lines(settings, url):
            console.print(f"  {line}")
        console.print(f"  database: {redact_url(settings.db_url)}")
        console.print("Ctrl-C stops it.")

    try:
        asyncio.run(root.run_web(settings, ready=ready))
    except AtelierError as exc:
        raise fail(exc) from None


def web_lines(settings: Settings, url: str) -> list[str]:
    """What start-up prints about the web app."""
    lines = [f"web: {url}"]
    public = settings.public_base_url.rstrip("/")
    if public != url:
        lines.append(f"  links point at {public} (ATELIER_PUBLIC_BASE_URL)")
    return lines


def main(argv: list[str] | None = None) -> None:
    """``python -m atelier.serve --name d1``: one dispatcher process (settings from the
    ``ATELIER_*`` environment), what `atelier dispatcher` runs, with two more knobs for tests."""
    import argparse

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
        root.run_dispatcher(
            settings, name=args.name, ray_address=args.ray_address,
            claim_idle_ms=args.claim_idle_ms, worker_prefix=args.worker_prefix,
        )
    )


if __name__ == "__main__":
    main()
