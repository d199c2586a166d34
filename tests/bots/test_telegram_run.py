"""Starting the bot the ways an operator does: `atelier up` (over its in-process stack),
`atelier bot telegram` (a process of its own, over Redis), webhook mode; and clear refusals of a
bad token or missing settings."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from atelier.app import local_stack, run_telegram_bot, start_bots
from atelier.cli import app as cli
from bots.telegram.run import start_bot
from bots.telegram.webhook import SECRET_HEADER
from cluster.dispatcher import Dispatcher, Pacing
from cluster.placement import WorkerPool
from core.errors import ConfigError
from storage.blobs import BlobStore
from storage.db import upgrade
from testing.net import free_port
from tests.bots.conftest import TINY, TOKEN, Stack, settings_for


async def test_atelier_up_starts_the_bot_over_its_local_stack(backend: Stack) -> None:
    fake, user = backend.fake, 5001
    # The single-box stack without Ray (the test's dispatcher and worker run the jobs).
    async with local_stack(backend.settings, workers=False, dispatcher=False) as stack:
        bots = await start_bots(backend.settings, stack)
        assert [name for name, _ in bots] == ["telegram (@atelier_test_bot)"]
        try:
            await fake.send(user, f"/imagine a kite over dunes {TINY}")
            photo = await fake.wait_call("sendPhoto", chat=user)
            assert photo.files["photo"].startswith(b"\x89PNG")
        finally:
            for _, stopper in bots:
                await stopper()
    (job,) = await backend.finished(1)
    assert job.status.value == "succeeded"
    # Stopped: nothing answers any more.
    await fake.send(user, "/help")
    await asyncio.sleep(1.5)
    assert not [c for c in fake.calls_of("sendMessage", chat=user) if "How to" in c.params["text"]]


async def test_atelier_up_without_redis_runs_the_bot_on_the_in_process_broker(
    backend: Stack, tmp_path: Path
) -> None:
    fake, user = backend.fake, 5005
    # A store of its own: the Redis-backed dispatcher of ``backend`` must not see this job.
    settings = settings_for(tmp_path / "single", None, fake)
    upgrade(settings.db_url)
    async with local_stack(settings, workers=False, dispatcher=False) as stack:
        assert stack.broker.kind == "memory"
        dispatcher = Dispatcher(
            dispatch=settings.dispatch.model_copy(update={"gather_window_ms": 20}),
            sessions=stack.sessions,
            broker=stack.broker,
            blobs=BlobStore.from_settings(settings),
            workers=await WorkerPool.from_handles([backend.worker]),
            name="single-box",
            models=backend.registry,
            pacing=Pacing(read_block_ms=200),
        )
        stop = asyncio.Event()
        dispatching = asyncio.create_task(dispatcher.run(stop))
        # The tiny model is the worker's, not in this bot's data dir: submit accepts it once
        # the dispatcher has published what its worker can load.
        async with asyncio.timeout(30):
            while not await stack.broker.registry.worker_models():
                await asyncio.sleep(0.05)
        bots = await start_bots(settings, stack)
        try:
            await fake.send(user, f"/imagine a lamp in a window {TINY}")
            await fake.wait_call("sendPhoto", chat=user)
            await fake.wait_for(
                lambda: any(
                    c.params["text"].startswith("✅")
                    for c in fake.calls_of("editMessageText", chat=user)
                ),
                what="the status message saying done",
            )
        finally:
            for _, stopper in bots:
                await stopper()
            stop.set()
            await asyncio.wait_for(dispatching, 60)
    assert not backend.jobs()  # nothing went through Redis


async def test_atelier_up_without_a_token_starts_no_bot(backend: Stack, tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, str(backend.settings.redis_url), backend.fake, telegram_token=None
    )
    async with local_stack(settings, workers=False, dispatcher=False) as stack:
        assert await start_bots(settings, stack) == []
    assert not backend.fake.calls


async def test_run_bot_serves_on_its_own_over_redis(backend: Stack) -> None:
    fake, user = backend.fake, 5002
    stop = asyncio.Event()
    running = asyncio.create_task(
        run_telegram_bot(backend.settings, stop=stop, poll_timeout=1)
    )
    try:
        await fake.send(user, f"/imagine a tram at night {TINY}")
        await fake.wait_call("sendPhoto", chat=user, timeout=90)
        # Serving with its start-up heap out of the collector's way (core/heap.py) ...
        assert gc.get_freeze_count() > 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
    assert gc.get_freeze_count() == 0  # ... and given back once stopped
    assert fake.calls_of("deleteWebhook")  # long polling
    (job,) = await backend.finished(1)
    assert len(backend.images(job.id)) == 1


async def test_webhook_mode_checks_the_secret_and_handles_an_update_once(
    backend: Stack, tmp_path: Path
) -> None:
    fake, user, secret, port = backend.fake, 5003, "s3cret_token-1", free_port()
    settings = settings_for(
        tmp_path,
        str(backend.settings.redis_url),
        fake,
        telegram_webhook_url="https://bot.example/hook",
        telegram_webhook_secret=secret,
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
    )
    bot = await start_bot(settings, backend.client, backend.broker, state=backend.state)
    try:
        hook = fake.calls_of("setWebhook")[0]
        assert hook.params["url"] == "https://bot.example/hook"
        assert hook.params["secret_token"] == secret
        assert not fake.calls_of("deleteWebhook")  # no polling
        update = {"update_id": 777, **fake.message(user, f"/imagine a red tram {TINY}")}
        url = f"http://127.0.0.1:{port}/hook"
        async with httpx.AsyncClient() as http:
            denied = await http.post(url, json=update, headers={SECRET_HEADER: "wrong"})
            assert denied.status_code == 403
            missing = await http.post(url, json=update)
            assert missing.status_code == 403
            for _ in range(2):  # Telegram retries a delivery it got no answer for
                ok = await http.post(url, json=update, headers={SECRET_HEADER: secret})
                assert ok.status_code == 200
        await fake.wait_call("sendPhoto", chat=user)
        await asyncio.sleep(0.5)
        assert len(backend.jobs()) == 1
        assert len(fake.calls_of("sendPhoto", chat=user)) == 1
        assert len(fake.calls_of("sendMessage", chat=user)) == 1  # one status message
    finally:
        await bot.stop()


async def test_a_webhook_taken_over_or_unreachable_is_an_error_said_once(
    backend: Stack, tmp_path: Path, error_logs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Telegram keeps the updates when it cannot reach the webhook, and another process with
    the token that polls deletes it: either way the bot hears nothing, so the log says so."""
    fake, hook = backend.fake, "https://bot.example/hook"
    settings = settings_for(
        tmp_path, str(backend.settings.redis_url), fake, telegram_webhook_url=hook,
        telegram_webhook_listen="127.0.0.1", telegram_webhook_port=free_port(),
    )
    caplog.set_level("WARNING", logger="bots.telegram.watch")
    bot = await start_bot(settings, backend.client, backend.broker, state=backend.state,
                          webhook_check_s=0.2)

    def said(text: str) -> list[str]:
        return [r.getMessage() for r in error_logs.records if text in r.getMessage()]

    async def until(text: str) -> None:
        async with asyncio.timeout(30):
            while not said(text) and text not in caplog.text:
                await asyncio.sleep(0.05)

    try:
        assert fake.webhook_url == hook
        await fake.push(fake.message(5004, "/help"))  # waits at Telegram
        fake.webhook_error = (int(time.time()) + 1, "SSL error: certificate verify failed")
        await until("cannot deliver updates")
        await asyncio.sleep(1)  # several more looks: the same error is said once
        (error,) = said("cannot deliver updates")
        assert hook in error and "certificate verify failed" in error and "(1 waiting)" in error

        async with httpx.AsyncClient(base_url=fake.base_url + TOKEN) as telegram:
            await telegram.post("/deleteWebhook")  # another process starts polling
            await until("the webhook is now unset")
            await asyncio.sleep(1)
            (lost,) = said("the webhook is now unset")
            assert hook in lost and "another process" in lost
            await telegram.post("/setWebhook", data={"url": hook})
            await until(f"the webhook is {hook} again")
        error_logs.records.clear()  # both were expected
    finally:
        await bot.stop()


async def test_a_refused_token_is_one_line_without_the_token(
    backend: Stack, tmp_path: Path
) -> None:
    wrong = "999999:refused-token-value"
    settings = settings_for(
        tmp_path, str(backend.settings.redis_url), backend.fake, telegram_token=wrong
    )
    with pytest.raises(ConfigError) as err:
        await start_bot(settings, backend.client, backend.broker, state=backend.state)
    assert "ATELIER_TELEGRAM_TOKEN" in err.value.message
    assert wrong not in err.value.message


async def test_an_unreachable_api_is_one_line(backend: Stack, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(
        tmp_path,
        str(backend.settings.redis_url),
        backend.fake,
        telegram_api_base_url=f"{closed}/bot",
        telegram_file_base_url=f"{closed}/file/bot",
    )
    with pytest.raises(ConfigError) as err:
        await start_bot(settings, backend.client, backend.broker, state=backend.state)
    assert "ATELIER_TELEGRAM_API_BASE_URL" in err.value.message
    assert TOKEN not in err.value.message


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "ATELIER_TELEGRAM_TOKEN"),
        ({"ATELIER_TELEGRAM_TOKEN": TOKEN}, "ATELIER_REDIS_URL"),
        (
            {"ATELIER_TELEGRAM_TOKEN": TOKEN, "ATELIER_TELEGRAM_WEBHOOK_URL": "http://x/hook"},
            "ATELIER_TELEGRAM_WEBHOOK_URL",
        ),
    ],
)
def test_bot_telegram_command_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for var in [v for v in os.environ if v.startswith("ATELIER_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)  # no stray .env
    result = CliRunner().invoke(cli, ["bot", "telegram"])
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output


def _bot_env(backend: Stack) -> dict[str, str]:
    """The environment of an ``atelier bot telegram`` process over ``backend``."""
    settings, fake = backend.settings, backend.fake
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")},
        "ATELIER_DATA_DIR": str(settings.data_dir),
        "ATELIER_DATABASE_URL": settings.db_url,
        "ATELIER_REDIS_URL": str(settings.redis_url),
        "ATELIER_TELEGRAM_TOKEN": TOKEN,
        "ATELIER_TELEGRAM_API_BASE_URL": fake.base_url,
        "ATELIER_TELEGRAM_FILE_BASE_URL": fake.base_file_url,
        "ATELIER_SIGNING_KEY": "k" * 40,
    }


async def test_atelier_bot_telegram_runs_until_interrupted(backend: Stack) -> None:
    """The real command in a process of its own: it makes an image, then exits on SIGINT."""
    settings, fake, user = backend.settings, backend.fake, 5004
    env = _bot_env(backend)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from atelier.cli import app; app(['bot', 'telegram'])",
        cwd=settings.data_dir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await fake.wait_call("deleteWebhook", timeout=90)  # polling
        await fake.send(user, f"/imagine a ferry at dawn {TINY}")
        await fake.wait_call("sendPhoto", chat=user)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    output = out.decode()
    assert proc.returncode == 0, output
    assert "long polling" in output and TOKEN not in output
    assert len(backend.jobs()) == 1


async def _bot_process(backend: Stack) -> asyncio.subprocess.Process:
    """``atelier bot telegram`` in a process of its own (SIGKILL it to stand for a crash)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from atelier.cli import app; app(['bot', 'telegram'])",
        cwd=backend.settings.data_dir, env=_bot_env(backend), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _crash_then_restart(backend: Stack, user: int, prompt: str, hold: str) -> None:
    """The first bot process is SIGKILLed once its upload of ``user``'s photo is held
    (``hold``: Telegram took it and never answered, or answered 429 with a long pause); a
    second one finishes the delivery."""
    fake = backend.fake
    first = await _bot_process(backend)
    try:
        await fake.wait_call("deleteWebhook", timeout=90)
        if hold == "taken":
            fake.delay("sendPhoto", 60)
        else:
            fake.fail(1, retry_after=60, method="sendPhoto")
        await fake.send(user, prompt)
        await fake.wait_for(lambda: fake.calls_of("sendPhoto", chat=user, ok=hold == "taken"),
                            timeout=120, what="the upload")
        await asyncio.sleep(0.5)  # the 429 answer read, the flood pause begun
    finally:
        first.kill()
        await first.wait()
    fake.delay("sendPhoto", 0)
    second = await _bot_process(backend)
    try:
        def delivered() -> bool:
            jobs = backend.jobs()
            return bool(jobs) and all(j.delivered_at is not None for j in jobs)

        await fake.wait_for(delivered, timeout=120, what="the job marked delivered")
        await asyncio.sleep(1.0)
    finally:
        second.send_signal(signal.SIGINT)
        await asyncio.wait_for(second.wait(), 60)


def _doubt_notes(fake: Any, user: int) -> int:
    return sum("restarted while sending" in str(c.params.get("text", ""))
               for c in fake.calls_of("sendMessage", chat=user))


async def test_a_bot_killed_while_telegram_takes_the_photo_does_not_post_it_twice(
    backend: Stack,
) -> None:
    """Found by the 30-minute chaos campaign: the bot process was SIGKILLed after Telegram had
    the photo and before the bot heard back. Its next run posted the photo again. Now it
    knows (its journal says the upload was under way) and says where the picture is instead:
    a second photo, never; a lost one, never either (it is in the gallery)."""
    fake, user = backend.fake, 5005
    await _crash_then_restart(backend, user, f"/imagine a kite over dunes {TINY}", "taken")
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    assert _doubt_notes(fake, user) == 1
    (job,) = backend.jobs()
    assert job.status == "succeeded"
    assert len(backend.images(job.id)) == 1  # in the gallery


async def test_a_bot_killed_during_a_flood_pause_posts_the_photo_on_its_next_run(
    backend: Stack,
) -> None:
    """Telegram answered 429: the photo is surely not in the chat, so the next process posts
    it (no note of doubt)."""
    fake, user = backend.fake, 5006
    await _crash_then_restart(backend, user, f"/imagine a heron in reeds {TINY}", "refused")
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1
    assert _doubt_notes(fake, user) == 0


async def test_polls_that_get_no_answer_are_reported_and_polling_starts_again(
    backend: Stack, error_logs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Telegram takes the polls but answers none: python-telegram-bot retries such timeouts
    quietly for ever; the watch says so in the log and polls again on new connections."""
    fake, user = backend.fake, 5003
    await backend.start_bot(poll_stale_s=2)
    assert backend.bot is not None and backend.bot.watch is not None
    watch = backend.bot.watch
    try:
        # Longer than PTB waits for a 1 s poll's answer (1 s + its 5 s read timeout).
        fake.delay("getUpdates", 8)

        def stalls() -> list[str]:
            return [r.getMessage() for r in error_logs.records
                    if "getUpdates has had no answer" in r.getMessage()]

        async with asyncio.timeout(60):
            while not stalls() or watch.restarts < 1:
                await asyncio.sleep(0.1)
        assert fake.base_url in stalls()[0]  # names the API it polls
        caplog.set_level("WARNING", logger="bots.telegram.watch")
        fake.delay("getUpdates", 0)  # Telegram answers again
        await fake.send(user, "/help")
        await fake.wait_call("sendMessage", chat=user, timeout=60)
        async with asyncio.timeout(30):
            while "long polling is back" not in caplog.text:
                await asyncio.sleep(0.1)
        # Also logged by PTB, as the watch stopped the stalled polling: marking the fetched
        # updates timed out too.
        error_logs.records.clear()
    finally:
        await backend.stop_bot()
