"""Starting the Discord bot the ways an operator does: `atelier bot discord [--sync] [--guild]`
(a process of its own, over Redis) and `atelier up` beside Telegram; clear refusals of missing
settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from atelier.app import local_stack, start_bots
from atelier.cli import app as cli
from testing.discord import payloads as p
from testing.discord.server import TOKEN
from tests.bots.discord_conftest import DiscordStack, discord_settings_for
from tests.bots.discord_helpers import TINY, images_of
from tests.conftest import free_port


def _env(stack: DiscordStack) -> dict[str, str]:
    settings, fake = stack.settings, stack.fake
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")},
        "ATELIER_DATA_DIR": str(settings.data_dir),
        "ATELIER_DATABASE_URL": settings.db_url,
        "ATELIER_REDIS_URL": str(settings.redis_url),
        "ATELIER_DISCORD_TOKEN": TOKEN,
        "ATELIER_DISCORD_API_BASE_URL": fake.api_base,
        "ATELIER_DISCORD_GATEWAY_URL": fake.gateway_url,
        "ATELIER_SIGNING_KEY": "k" * 40,
    }


async def _bot_process(
    stack: DiscordStack, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`atelier bot discord ARGS` as a process of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from atelier.cli import app; app()",
        "bot",
        "discord",
        *args,
        cwd=stack.settings.data_dir,
        env=_env(stack) | (env or {}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_atelier_bot_discord_syncs_to_a_server_then_runs_until_interrupted(
    discord_backend: DiscordStack,
) -> None:
    fake = discord_backend.fake
    port = free_port()
    proc = await _bot_process(discord_backend, "--sync", "--guild", str(p.GUILD_ID),
                              env={"ATELIER_METRICS__PORT": str(port)})
    try:
        await fake.wait_for(lambda: fake.identifies, 90, "the bot on the gateway")
        help_ = await fake.slash(42, "help")
        await fake.wait_for(lambda: help_.callback, what="the /help answer")
        # The bot process serves /metrics and /readyz (store and broker) like every other.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):  # served once the bot is ready
                with contextlib.suppress(httpx.ConnectError):
                    scraped = await http.get("/metrics")
                    break
                await asyncio.sleep(0.1)
            ready = await http.get("/readyz")
        assert scraped.status_code == 200 and b"atelier_bot_rate_limited_total" in scraped.content
        assert ready.status_code == 200, ready.text
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    output = out.decode()
    assert proc.returncode == 0, output
    assert "help" in {c["name"] for c in fake.commands[str(p.GUILD_ID)]}
    assert "global" not in fake.commands
    assert TOKEN not in output


async def test_a_bot_process_killed_mid_job_has_the_next_one_post_once(
    discord_backend: DiscordStack,
) -> None:
    fake = discord_backend.fake
    await discord_backend.stop_dispatcher()
    first = await _bot_process(discord_backend)
    try:
        await fake.wait_for(lambda: fake.identifies, 90, "the first bot on the gateway")
        inter = await fake.slash(42, "imagine", [p.option("prompt", f"a paper crane {TINY}")])
        # The status with its cancel button: the job is in the queue.
        await fake.wait_for(
            lambda: [c for c in fake.calls_to("PATCH /webhooks/") if c.custom_ids()],
            60,
            "the queued status",
        )
    finally:
        first.kill()  # no goodbye: nothing of it is stopped cleanly
        await first.wait()
    await discord_backend.start_dispatcher()
    (job,) = await discord_backend.finished(1)

    second = await _bot_process(discord_backend)
    try:
        await fake.wait_for(lambda: images_of(fake, inter.token), 90, "the images")
        await asyncio.sleep(1.5)
    finally:
        second.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(second.communicate(), 60)
    assert second.returncode == 0, out.decode()
    assert len(images_of(fake, inter.token)) == 1
    assert (await discord_backend.client.job(job.id)).delivered_at is not None


def _cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> str:
    for var in [v for v in os.environ if v.startswith("ATELIER_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    result = CliRunner().invoke(cli, ["bot", "discord", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({}, (), "ATELIER_DISCORD_TOKEN"),
        ({"ATELIER_DISCORD_TOKEN": "x.y.z"}, (), "ATELIER_REDIS_URL"),
        ({"ATELIER_DISCORD_TOKEN": "x.y.z"}, ("--guild", "5"), "--guild only goes with --sync"),
        ({"ATELIER_DISCORD_GATEWAY_URL": "https://x"}, (), "ws:// or wss://"),
    ],
)
def test_bot_discord_command_names_what_is_missing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    args: tuple[str, ...],
    named: str,
) -> None:
    assert named in _cli(tmp_path, monkeypatch, env, *args)


async def test_atelier_up_starts_the_discord_bot_when_its_token_is_set(
    discord_backend: DiscordStack, tmp_path: Path
) -> None:
    fake = discord_backend.fake
    settings = discord_settings_for(tmp_path, str(discord_backend.settings.redis_url), fake)
    async with local_stack(settings, workers=False, dispatcher=False) as stack:
        bots = await start_bots(settings, stack)
        try:
            assert [name for name, _ in bots] == ["discord (atelier)"]
            help_ = await fake.slash(42, "help")
            await fake.wait_for(lambda: help_.callback, what="the /help answer")
        finally:
            for _, stopper in bots:
                await stopper()
    assert fake.identifies == 1
