"""Hostile requests against the one event loop of `atelier up` (a script, and the harness of
tests/atelier/test_hostile.py). The web app is served as `atelier up` serves it (uvicorn in
this process's loop, over the single-box stack) with the Telegram bot on the same loop,
talking to the loopback fake Bot API (in a thread of its own: the platform is elsewhere).
Another process then sends 30 MB bodies (declared and streamed), 10 MB and 5 MB images and
1 MB prompts to the REST and A1111 APIs, and the fake sends 1 MB prompts and 10 MB photos to
the bot. Meanwhile: /healthz latency from a thread (p50, p99, max) and, from the fake, the
time from a chat command to the bot's first reply.

``.venv/bin/python -m bench.hostile [--seconds 10] [--body-mb 30]``  (goal: p99 and the
slowest first reply both under 100 ms; on a loop that does this work itself, seconds)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
from PIL import Image

TOKEN = "123456789:AAF-hostile-bench-token"
# Checked, priced and queued: the first reply is the job's status message.
PROBE = "/imagine a lighthouse at dusk --w 64 --h 64 --steps 2"
HEALTHZ_EVERY_S = 0.01
CHAT_EVERY_S = 0.25
# Each attacking thread waits this long between its requests: requests in flight, not a
# flood of the loopback's bandwidth (whose kernel work would take the box's CPUs from all).
ATTACK_PAUSE_S = 0.3
MB = 1024 * 1024
WAIT_S = 60.0  # a probe not answered by then counts as this long


# Payloads -----------------------------------------------------------------------------------


def noise_jpeg(side: int, quality: int) -> bytes:
    """A JPEG of random pixels (compresses badly, so the bytes and the pixels are many)."""
    rng = np.random.default_rng(side)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def photo_10mb() -> bytes:
    return noise_jpeg(3500, 88)  # about 10 MB, 12 megapixels


@dataclass(frozen=True)
class Attack:
    name: str
    path: str
    body: bytes
    streamed: bool = False  # sent chunked, with no Content-Length

    def content(self) -> bytes | Iterator[bytes]:
        if not self.streamed:
            return self.body
        return (self.body[i : i + 64 * 1024] for i in range(0, len(self.body), 64 * 1024))


def attacks(body_mb: int) -> list[Attack]:
    """The hostile requests, each refused one way or another (nothing is queued): the text
    and size checks, or an impossible step count after the image was decoded."""
    big_prompt = "a lighthouse " * (body_mb * MB // 13)
    prompt_1mb = "a lighthouse " * (MB // 13)
    image_10mb = base64.b64encode(photo_10mb()).decode()
    image_5mb = base64.b64encode(noise_jpeg(2900, 80)).decode()  # fits an 8 MiB body

    def js(**fields: Any) -> bytes:
        return json.dumps(fields).encode()

    # Cheap refusals between the costly ones: each thread starts at its own place.
    return [
        Attack("prompt-1mb-v1", "/api/v1/jobs", js(prompt=prompt_1mb)),
        Attack("body-declared", "/api/v1/jobs", js(prompt=big_prompt)),
        Attack("image-5mb-v1", "/api/v1/jobs",
               js(prompt="a fox", kind="img2img", init_image=image_5mb, steps=1000)),
        Attack("prompt-1mb-sdapi", "/sdapi/v1/txt2img",
               js(prompt="a fox", negative_prompt=prompt_1mb)),
        Attack("body-streamed", "/sdapi/v1/txt2img", js(prompt=big_prompt), streamed=True),
        Attack("image-5mb-sdapi", "/sdapi/v1/img2img",
               js(prompt="a fox", init_images=[image_5mb], steps=1000)),
        Attack("image-10mb-sdapi", "/sdapi/v1/img2img",
               js(prompt="a fox", init_images=[image_10mb], steps=20)),
    ]


def attack(
    plan: list[Attack], url: str, key: str, seconds: float
) -> dict[str, Counter[str]]:
    """Send the attacks round-robin from a thread each for ``seconds``; outcomes by attack
    (status code, or the error's name when the server cut the connection)."""
    outcomes: dict[str, Counter[str]] = {a.name: Counter() for a in plan}
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def fire(offset: int) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=url, timeout=WAIT_S) as http:
            n = offset
            while time.monotonic() < end:
                a = plan[n % len(plan)]
                n += 1
                try:
                    outcome = str(http.post(a.path, content=a.content(), headers=headers)
                                  .status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes[a.name][outcome] += 1
                time.sleep(ATTACK_PAUSE_S)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(len(plan))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


# Measuring ----------------------------------------------------------------------------------


@dataclass
class Figures:
    """One measured window."""

    healthz_ms: list[float] = field(default_factory=list)
    chat_ms: list[float] = field(default_factory=list)
    web: dict[str, dict[str, int]] = field(default_factory=dict)
    chat: dict[str, int] = field(default_factory=dict)
    replies: dict[str, int] = field(default_factory=dict)  # the probes' first replies

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("inf")

    @property
    def healthz_p99(self) -> float:
        return self._pct(self.healthz_ms, 0.99)

    @property
    def chat_median(self) -> float:
        return statistics.median(self.chat_ms) if self.chat_ms else float("inf")

    @property
    def chat_max(self) -> float:
        return max(self.chat_ms, default=float("inf"))

    def lines(self) -> list[str]:
        h, c = self.healthz_ms, self.chat_ms
        return [
            f"/healthz: {len(h)} probes, p50 {self._pct(h, 0.5):.1f} ms, "
            f"p99 {self.healthz_p99:.1f} ms, max {max(h, default=float('inf')):.1f} ms",
            f"chat first reply: {len(c)} commands, median {self.chat_median:.1f} ms, "
            f"max {self.chat_max:.1f} ms",
            "web attacks: " + "; ".join(
                f"{name} {dict(sorted(out.items()))}" for name, out in self.web.items()
            ),
            "chat attacks: " + ", ".join(f"{k} {v}" for k, v in sorted(self.chat.items())),
            "probe replies: " + "; ".join(f"{v} x {k!r}" for k, v in self.replies.items()),
        ]


def probe_healthz(url: str, stop: threading.Event, out: list[float]) -> None:
    """GET /healthz every HEALTHZ_EVERY_S until ``stop``, each one's time in ms: a new
    connection each time, as a load balancer's check makes (a plain socket: httpx's own
    client adds tens of ms of its own here)."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while not stop.is_set():
        start = time.perf_counter()
        answer = b""
        with contextlib.suppress(TimeoutError), socket.create_connection(
            (host, int(port)), timeout=WAIT_S
        ) as sock:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                answer += chunk
        if answer and not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/healthz answered {answer[:100]!r}")
        out.append((time.perf_counter() - start) * 1000)  # no answer: WAIT_S
        time.sleep(HEALTHZ_EVERY_S)


class ChatSide:
    """The fake Bot API on a loop in its own thread, sending probes (a fresh user's command,
    timed to the first message back) and hostile updates (1 MB prompts, 10 MB photos)."""

    def __init__(self) -> None:
        from testing.telegram import FakeTelegram

        self.fake = FakeTelegram(TOKEN)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.fake.start())
        self.photo = photo_10mb()
        self.users = iter(range(10_000, 10_000_000))
        self.replies: dict[str, int] = {}

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=WAIT_S * 2)

    def run(self, seconds: float, hostile: bool, figures: Figures) -> None:
        self.call(self._run(seconds, hostile, figures))

    async def _run(self, seconds: float, hostile: bool, figures: Figures) -> None:
        end = time.monotonic() + seconds
        tasks = [asyncio.create_task(self._hostile(end, figures.chat))] if hostile else []
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(self._probe(next(self.users), figures.chat_ms)))
            await asyncio.sleep(CHAT_EVERY_S)
        await asyncio.gather(*tasks)

    async def _probe(self, user: int, out: list[float]) -> None:
        sent = time.monotonic()
        await self.fake.send(user, PROBE)
        try:
            reply = await self.fake.wait_call("sendMessage", chat=user, timeout=WAIT_S)
        except AssertionError:  # no reply within WAIT_S: counted as WAIT_S
            out.append(WAIT_S * 1000)
        else:
            out.append((reply.at - sent) * 1000)
            text = str(reply.params.get("text", ""))[:60]
            self.replies[text] = self.replies.get(text, 0) + 1

    async def _hostile(self, end: float, counts: dict[str, int]) -> None:
        text = "/imagine " + "a lighthouse " * (MB // 13)
        n = 0
        while time.monotonic() < end:
            user = next(self.users)
            kind = "10 MB photo" if n % 2 else "1 MB prompt"
            if n % 2:
                await self.fake.send_photo(user, self.photo, caption="a fox --steps 1000")
            else:
                await self.fake.send(user, text)
            counts[kind] = counts.get(kind, 0) + 1
            n += 1
            await asyncio.sleep(0.5)

    def close(self) -> None:
        self.call(self.fake.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _attack_into(
    into: dict[str, Counter[str]], plan: list[Attack], url: str, key: str, seconds: float
) -> None:
    if plan:
        into.update(attack(plan, url, key, seconds))


def outside(seconds: float, rounds: int, body_mb: int, hostile: bool, baseline: bool) -> None:
    """The world outside the server, in a process of its own (so none of its work competes
    with the server's loop for the GIL): the fake Bot API, the attackers and the probes.
    Protocol on stdin/stdout, one JSON line each: it says where the fake is; it is told the
    web app's URL and an API key; it answers each round's figures; then it waits for its
    stdin to close before stopping the fake (the bot's shutdown still calls it).
    ``baseline``: one more round first, with no attack."""
    plan = attacks(body_mb) if hostile else []
    chat = ChatSide()
    print(json.dumps({"api": chat.fake.base_url, "files": chat.fake.base_file_url}), flush=True)
    told = json.loads(sys.stdin.readline())
    url, key = told["url"], told["key"]
    for n in range(rounds + baseline):
        if n:
            sys.stdin.readline()  # the server side is ready for the next round
        figures = Figures()
        attacking = hostile and not (baseline and n == 0)
        stop = threading.Event()
        probe = threading.Thread(target=probe_healthz, args=(url, stop, figures.healthz_ms))
        probe.start()
        web: dict[str, Counter[str]] = {}
        attacker = threading.Thread(
            target=_attack_into, args=(web, plan if attacking else [], url, key, seconds)
        )
        attacker.start()
        chat.run(seconds, attacking, figures)
        attacker.join()
        stop.set()
        probe.join()
        figures.web = {k: dict(v) for k, v in web.items()}
        figures.replies, chat.replies = chat.replies, {}
        print(json.dumps(figures.__dict__), flush=True)
    sys.stdin.read()
    chat.close()


def _settings(data_dir: Path, api: str, files: str) -> Any:
    from core.settings import load_settings
    from storage.db import upgrade

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models.toml").write_text('default = "tiny"\n')
    settings = load_settings(
        _env_file=None, data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'atelier.db'}",
        redis_url=None, web_listen="127.0.0.1:0", signing_key="k" * 40,
        telegram_token=TOKEN, telegram_api_base_url=api, telegram_file_base_url=files,
        # The worst case: every hostile request reaches its route.
        web_rate={"per_key": 0, "per_ip": 0},
    )
    upgrade(settings.db_url)
    return settings


async def measure(
    data_dir: Path, *, seconds: float = 10.0, rounds: int = 1, body_mb: int = 30,
    hostile: bool = True, baseline: bool = False,
) -> list[Figures]:
    """Serve everything on this loop as `atelier up` does, let the outside process attack it
    for ``rounds`` windows of ``seconds`` and measure meanwhile (``hostile=False``: measure
    only); the figures of each window, first a window with no attack when ``baseline``."""
    from atelier.app import local_stack, serve_web
    from bots.common.state import MemoryState
    from bots.telegram.run import start_bot
    from core.jobs import Requester

    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "outside", "--seconds", str(seconds),
         "--rounds", str(rounds), "--body-mb", str(body_mb), *([] if hostile else ["--quiet"]),
         *(["--baseline"] if baseline else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        fake = json.loads(await asyncio.to_thread(proc.stdout.readline))
        settings = _settings(data_dir, fake["api"], fake["files"])
        async with (
            local_stack(settings, dispatcher=False, workers=False) as stack,
            serve_web(stack) as url,
        ):
            # Jobs are checked against the models a worker can load: "tiny" (none runs here).
            await stack.broker.registry.publish_worker_models("hostile-bench", ["tiny"], ttl_s=3600)
            bot = await start_bot(settings, stack.client, stack.broker, state=MemoryState(),
                                  poll_timeout=1)
            try:
                key = await stack.client.create_api_key(
                    Requester(platform="telegram", platform_user_id="666")
                )
                proc.stdin.write(json.dumps({"url": url, "key": key.key}) + "\n")
                proc.stdin.flush()
                found = []
                for n in range(rounds + baseline):
                    if n:
                        await _cancel_queued(stack.client)
                        proc.stdin.write("next\n")
                        proc.stdin.flush()
                    line = await asyncio.to_thread(proc.stdout.readline)
                    if not line:
                        raise RuntimeError("the outside process ended early")
                    found.append(Figures(**json.loads(line)))
            finally:
                await bot.stop()
        return found
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def _cancel_queued(client: Any) -> None:
    """Cancel the probes' jobs between rounds: no worker runs them here, and each has a
    watcher reading the store twice a second, which would pile up round after round."""
    from core.errors import AtelierError
    from core.jobs import Requester

    for job in await client.live_jobs("telegram"):
        owner = Requester(platform="telegram", platform_user_id=job.delivery.extra["owner"])
        with contextlib.suppress(AtelierError):
            await client.cancel(job.id, owner)
    await asyncio.sleep(2)  # the bot posts the cancellations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=["outside"],
                        help="(internal) be the outside process")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--body-mb", type=int, default=30)
    parser.add_argument("--quiet", action="store_true", help="no attack at all")
    parser.add_argument("--baseline", action="store_true",
                        help="first a round with no attack, to compare")
    args = parser.parse_args(argv)
    if args.command == "outside":
        outside(args.seconds, args.rounds, args.body_mb, hostile=not args.quiet,
                baseline=args.baseline)
        return
    with tempfile.TemporaryDirectory() as tmp:
        found = asyncio.run(measure(
            Path(tmp) / "data", seconds=args.seconds, rounds=args.rounds,
            body_mb=args.body_mb, hostile=not args.quiet, baseline=args.baseline,
        ))
    for n, figures in enumerate(found, 0 if args.baseline else 1):
        quiet = args.quiet or (args.baseline and n == 0)
        print(f"round {n}{' (no attack)' if quiet else ''}:")
        for line in figures.lines():
            print(f"  {line}")


if __name__ == "__main__":
    main()
