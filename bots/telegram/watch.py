"""The bot's link to Telegram, watched: nothing that leaves the bot deaf goes unsaid.

``PollWatch`` notices when getUpdates has had no answer for a while and says so, then starts
polling again on a fresh connection pool. python-telegram-bot retries a timed-out getUpdates
quietly, at debug level, for ever. An API that takes connections but never answers, or a pool
whose connections a cancelled poll never gave back (every later poll waits for one and times
out before it is sent), leaves the bot deaf with nothing in the logs. ``AnsweredRequest``
records when Telegram last answered a getUpdates; the watch compares that with the clock.

``WebhookWatch`` asks Telegram about the webhook now and then (getWebhookInfo): another
process with the same token that polls (its start deletes the webhook) or sets its own takes
every update, and Telegram failing to reach the webhook's address (a proxy or certificate
gone wrong) keeps them all; either is an ERROR naming what Telegram says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from telegram import Update
from telegram.error import TelegramError
from telegram.ext import Application
from telegram.request import HTTPXRequest

from bots.common.delivery import cancel_and_wait

log = logging.getLogger(__name__)

REQUEST_KEY = "atelier.get_updates_request"  # app.bot_data: the AnsweredRequest polling uses
POOL_WAIT_S = 10.0  # for a getUpdates connection (PTB's default: 1 s)
# What PTB adds to a long poll's own timeout before it gives up on an answer: its read and
# connect timeouts (5 s each), and the wait for a connection before the request goes out.
SLACK_S = 5.0 + 5.0 + POOL_WAIT_S


class AnsweredRequest(HTTPXRequest):
    """An ``HTTPXRequest`` that records when the server last answered (any answer: an error
    status is an answer too)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, **options: Any) -> None:
        super().__init__(**options)
        self.clock = clock
        self.answered_at = clock()

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        answer = await super().do_request(*args, **kwargs)
        self.answered_at = self.clock()
        return answer


def polling_request() -> AnsweredRequest:
    """The request object for getUpdates. Two connections and a 10 s wait for one: stopping
    cancels the poll under way and at once marks the fetched updates with one more
    getUpdates, which with PTB's one connection and 1 s wait timed out (an error at a busy
    shutdown) while the cancelled poll still held the connection."""
    return AnsweredRequest(connection_pool_size=2, pool_timeout=POOL_WAIT_S)


class Watch:
    """A task of its own, started once the bot runs and stopped before it stops."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=type(self).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _watch(self) -> None:
        raise NotImplementedError


class PollWatch(Watch):
    """Watches ``app``'s long polling: when getUpdates has had no answer for ``stale_s``
    (default: three polls' worth, with PTB's own waits), logs an error naming the API and
    starts polling again with a fresh HTTP client; once answers come back, logs that too."""

    def __init__(
        self,
        app: Application,  # type: ignore[type-arg]
        *,
        poll_timeout: int,
        api: str,
        stale_s: float | None = None,
    ) -> None:
        super().__init__()
        self.app = app
        self.request: AnsweredRequest = app.bot_data[REQUEST_KEY]
        self.poll_timeout = poll_timeout
        self.api = api
        self.stale_s = stale_s if stale_s is not None else 3 * (poll_timeout + SLACK_S)
        self.restarts = 0

    async def start_polling(self) -> None:
        # Deletes any webhook first, as Telegram allows one or the other.
        assert self.app.updater is not None
        await self.app.updater.start_polling(
            poll_interval=0, timeout=self.poll_timeout, allowed_updates=Update.ALL_TYPES
        )

    async def _watch(self) -> None:
        stalled = False
        while True:
            await asyncio.sleep(min(self.stale_s / 4, 15.0))
            silent_s = self.request.clock() - self.request.answered_at
            if silent_s < self.stale_s:
                if stalled:
                    log.warning("telegram: getUpdates answers again; long polling is back")
                    stalled = False
                continue
            log.error(
                "telegram: getUpdates has had no answer from %s for %.0f s: the bot hears "
                "nothing; starting long polling again on new connections",
                self.api, silent_s,
            )
            stalled = True
            try:
                await self._restart()
            except Exception:  # the watch goes on; the next round tries again
                log.exception("telegram: long polling could not be started again")
            self.request.answered_at = self.request.clock()  # a new stall counts from here

    async def _restart(self) -> None:
        updater = self.app.updater
        assert updater is not None
        self.restarts += 1
        if updater.running:
            await updater.stop()
        # A fresh client: connections a cancelled poll never gave back go with the old one
        # (httpx marks it closed before it closes the connections, so a close that hangs
        # still lets ``initialize`` build the new one).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.request.shutdown(), 10)
        await self.request.initialize()
        await self.start_polling()


class WebhookWatch(Watch):
    """Asks Telegram every ``every_s`` whether the webhook is still ``url`` and whether its
    deliveries fail. Each change is said once: an ERROR when the webhook is another's (or
    gone), or when Telegram reports a new delivery error; a WARNING when it is ours again."""

    def __init__(
        self,
        app: Application,  # type: ignore[type-arg]
        *,
        url: str,
        every_s: float = 60.0,
    ) -> None:
        super().__init__()
        self.app = app
        self.url = url
        self.every_s = every_s
        self.lost = False
        # Delivery errors Telegram reports from before this start are an earlier run's.
        self._errors_since = datetime.now(UTC)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.check()
            except TelegramError as exc:  # out of reach for now: the next look tries again
                log.warning("telegram: cannot ask Telegram about the webhook: %s", exc)
            except Exception:  # the watch goes on
                log.exception("telegram: looking at the webhook failed")

    async def check(self) -> None:
        """One look at getWebhookInfo."""
        info = await self.app.bot.get_webhook_info()
        if info.url != self.url:
            if not self.lost:
                log.error(
                    "telegram: the webhook is now %s, not %s: another process with this "
                    "token polls or set its own, and this bot hears nothing; stop the other "
                    "one and restart this one",
                    info.url or "unset", self.url,
                )
            self.lost = True
            return
        if self.lost:
            log.warning("telegram: the webhook is %s again", self.url)
            self.lost = False
        when = info.last_error_date
        if when is not None and when > self._errors_since:
            self._errors_since = when
            log.error(
                "telegram: Telegram cannot deliver updates to %s: %s (%d waiting)",
                self.url, info.last_error_message or "no reason given",
                info.pending_update_count,
            )
