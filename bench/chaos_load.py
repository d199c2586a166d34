"""The chaos campaign's users: a steady stream of Telegram updates from many accounts through the
fake Bot API (text-to-image in several styles, img2img, cancels, the same update twice), and a
fake that counts the photos it receives per job and can answer 429 to everything for a while."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import random
import time
from typing import Any

from aiohttp import web
from PIL import Image

from bots.common.buttons import Action, BadButton, parse
from testing.telegram import Call, FakeTelegram, _error

TOKEN = "123456789:AAF-chaos-token"
FIRST_USER = 70_001
TINY = "--w 64 --h 64 --steps 2"
# Long enough (a second or two on a tiny worker) for a cancel to land mid-run now and then.
SLOW = "--w 256 --h 256 --steps 20"
STYLES = ("none", "watercolor", "anime", "cinematic", "oil-painting", "photographic")
WORDS = ("lighthouse", "fox", "harbor", "forest", "castle", "teapot", "dragon", "garden",
         "robot", "meadow", "lantern", "glacier", "owl", "bridge", "violin", "desert")
KINDS = (("t2i", 0.55), ("img2img", 0.15), ("duplicate", 0.15), ("cancel", 0.15))


class ChaosTelegram(FakeTelegram):
    """The fake Bot API, plus: photos counted per job (from the job id in their buttons), and a
    429 storm (every call but getUpdates refused until a deadline)."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self.photos: list[tuple[float, str]] = []  # (monotonic time, job id) per photo posted
        self.storm_until = 0.0
        self.storm_retry_after = 1
        self.storm_refusals = 0

    def storm(self, seconds: float, retry_after: int) -> None:
        self.storm_until = time.monotonic() + seconds
        self.storm_retry_after = retry_after

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method != "getUpdates" and time.monotonic() < self.storm_until:
            self.storm_refusals += 1
            return _error(429, f"Too Many Requests: retry after {self.storm_retry_after}",
                          {"retry_after": self.storm_retry_after})
        response = await super()._api(request)
        if self.calls and self.calls[-1].files:
            self.calls[-1].files = {}  # see _upload
        return response

    async def _m_sendPhoto(self, call: Call) -> Any:
        result = await super()._m_sendPhoto(call)
        self.photos.append((time.monotonic(), job_of(call) or "?"))
        return result

    def _upload(self, call: Call, field_name: str, value: Any = None) -> tuple[str, int]:
        # Keep memory flat over a long run: what the bot uploads is counted, not kept.
        return f"posted{len(self.photos)}", 1


def job_of(call: Call) -> str | None:
    """The job a message's buttons are about."""
    for b in call.buttons():
        try:
            job = parse(str(b.get("callback_data", ""))).job_id
        except BadButton:
            continue
        if job:
            return job
    return None


@dataclasses.dataclass
class Sent:
    """One /imagine the driver sent (a duplicate sends the same message twice)."""

    kind: str
    user: int
    message_id: int
    at: float
    cancel_pressed: bool = False

    @property
    def key(self) -> str:
        return f"telegram:{self.user}:{self.message_id}"


def _png(rng: random.Random) -> bytes:
    img = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class Load:
    """Sends ``rate`` jobs a second from ``users`` accounts until stopped (``seed``: which)."""

    def __init__(self, fake: ChaosTelegram, *, rate: float, users: int, seed: int) -> None:
        self.fake = fake
        self.rate = rate
        self.users = [FIRST_USER + n for n in range(users)]
        self.rng = random.Random(seed)
        self.sent: list[Sent] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def prompt(self, slow: bool = False) -> str:
        words = " ".join(self.rng.sample(WORDS, 3))
        style = self.rng.choice(STYLES)
        return f"a {words} --style {style} --seed {self.rng.randrange(10**6)} " + (
            SLOW if slow else TINY)

    async def poison(self) -> Sent:
        """A job no worker can run: its model's weights are corrupt."""
        user = self.rng.choice(self.users)
        msg = await self.fake.send(user, f"/imagine a broken {self.prompt()} --model tiny-broken")
        sent = Sent("poison", user, int(msg["message_id"]), time.monotonic())
        self.sent.append(sent)
        return sent

    async def one(self) -> None:
        kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        user = self.rng.choice(self.users)
        now = time.monotonic()
        if kind == "img2img":
            msg = await self.fake.send_photo(user, _png(self.rng),
                                             caption=f"{self.prompt()} --strength 0.6")
        else:
            update = self.fake.message(user, f"/imagine {self.prompt(slow=kind == 'cancel')}")
            await self.fake.push(update)
            msg = update["message"]
            if kind == "duplicate":  # the same message again, as a second update
                self._spawn(self._again(update, self.rng.uniform(0.05, 3.0)))
        sent = Sent(kind, user, int(msg["message_id"]), now)
        self.sent.append(sent)
        if kind == "cancel":
            self._spawn(self._cancel(sent, self.rng.uniform(0.0, 1.5)))

    async def _again(self, update: dict[str, Any], delay: float) -> None:
        await asyncio.sleep(delay)
        await self.fake.push(dict(update))

    async def _cancel(self, sent: Sent, delay: float) -> None:
        """Press Cancel on the job's status message (the bot's reply to the /imagine, which
        gets its Cancel button in a later edit) ``delay`` seconds after the button shows."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self._status_message(sent)
            markup = (status or {}).get("reply_markup") or {}
            buttons = [b for row in markup.get("inline_keyboard", []) for b in row]
            data = next((b["callback_data"] for b in buttons if _is_cancel(b)), None)
            if status is not None and data is not None:
                await asyncio.sleep(delay)
                await self.fake.press(sent.user, dict(status), data)
                sent.cancel_pressed = True
                return
            await asyncio.sleep(0.1)

    def _status_message(self, sent: Sent) -> dict[str, Any] | None:
        """The first status message posted to the user's chat after ``sent`` that shows a
        Cancel button now (the user's other jobs' may be among them: a cancel all the same)."""
        found = None
        for call in reversed(self.fake.calls):  # newest first, back to ``sent``
            if call.at < sent.at:
                break
            if (call.method != "sendMessage" or call.chat_id != sent.user
                    or not isinstance(call.result, dict)):
                continue
            message = self.fake.messages.get((sent.user, int(call.result["message_id"])))
            markup = (message or {}).get("reply_markup") or {}
            if any(_is_cancel(b) for row in markup.get("inline_keyboard", []) for b in row):
                found = message
        return found

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        gap = 1.0 / self.rate
        next_at = time.monotonic()
        while not stop.is_set():
            await self.one()
            next_at += self.rng.expovariate(1.0) * gap
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        for task in list(self._tasks):
            task.cancel()


def _is_cancel(b: dict[str, Any]) -> bool:
    try:
        return parse(str(b.get("callback_data", ""))).action is Action.cancel
    except BadButton:
        return False
