"""Running the Telegram bot: ``start_bot`` inside a process that has a client, a broker and the
bots' state (built by the composition root, atelier/app.py: for ``atelier up`` over its
single-box stack, or ``atelier bot telegram``, a process of its own over the shared Redis and
database). Long polling unless ATELIER_TELEGRAM_WEBHOOK_URL is set."""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

from telegram import Update
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application

from bots.common.logs import mask
from bots.common.state import BotState
from bots.telegram.app import build_application
from bots.telegram.watch import PollWatch, Watch, WebhookWatch
from bots.telegram.webhook import WebhookServer
from cluster.broker import Broker
from cluster.client import Client
from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_POLL_TIMEOUT_S = 10


class RunningBot:
    """A started bot; ``stop()`` ends it (unsent deliveries stay pending for the next start)."""

    def __init__(
        self,
        app: Application,  # type: ignore[type-arg]
        webhook: WebhookServer | None,
        watch: Watch | None = None,
    ) -> None:
        self.app = app
        self.webhook = webhook
        self.watch = watch  # of the long polling or the webhook

    @property
    def username(self) -> str:
        return str(self.app.bot.username)

    async def stop(self) -> None:
        if self.watch is not None:
            await self.watch.stop()
        if self.webhook is not None:
            await self.webhook.stop()
        elif self.app.updater is not None and self.app.updater.running:
            await self.app.updater.stop()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()


async def start_bot(
    settings: Settings,
    client: Client,
    broker: Broker,
    *,
    state: BotState,
    poll_timeout: int = DEFAULT_POLL_TIMEOUT_S,
    poll_stale_s: float | None = None,
    webhook_check_s: float = 60.0,
    **options: Any,
) -> RunningBot:
    """Build the Application (``options`` go to ``build_application``), reach Telegram and
    start taking updates. ConfigError, with the token masked, if Telegram refuses the token
    or cannot be reached. ``state`` stays the caller's (atelier/app.py opens and closes it).
    ``poll_stale_s``: how long getUpdates may go unanswered before ``PollWatch`` says so and
    polls again (default: three polls' worth); ``webhook_check_s``: how often
    ``WebhookWatch`` asks Telegram about the webhook."""
    app = build_application(settings, client, broker, state=state, **options)
    webhook: WebhookServer | None = None
    watch: Watch | None = None
    try:
        await app.initialize()  # getMe: checks the token and the API's address
        if settings.telegram_webhook_url:
            url = settings.telegram_webhook_url
            secret = (
                settings.telegram_webhook_secret.get_secret_value()
                if settings.telegram_webhook_secret is not None
                else secrets.token_urlsafe(32)  # only this process needs to know it
            )
            webhook = WebhookServer(
                app,
                url=url,
                secret_token=secret,
                listen=settings.telegram_webhook_listen,
                port=settings.telegram_webhook_port,
            )
            await webhook.start()
            await app.bot.set_webhook(url, secret_token=secret, allowed_updates=Update.ALL_TYPES)
            await app.start()
            watch = WebhookWatch(app, url=url, every_s=webhook_check_s)
            watch.start()
            log.info("telegram bot @%s: webhook %s", app.bot.username, url)
        else:
            watch = PollWatch(app, poll_timeout=poll_timeout, stale_s=poll_stale_s,
                              api=settings.telegram_api_base_url)
            await watch.start_polling()
            await app.start()
            watch.start()
            log.info("telegram bot @%s: long polling", app.bot.username)
    except BaseException as exc:
        await _abandon(RunningBot(app, webhook, watch))
        if isinstance(exc, InvalidToken):
            raise ConfigError(
                f"Telegram refused ATELIER_TELEGRAM_TOKEN ({mask(str(exc))})"
            ) from None
        if isinstance(exc, NetworkError):
            raise ConfigError(
                f"cannot reach the Telegram Bot API at {settings.telegram_api_base_url} "
                f"(ATELIER_TELEGRAM_API_BASE_URL): {mask(str(exc))}"
            ) from None
        if isinstance(exc, TelegramError):
            raise ConfigError(f"Telegram refused to start the bot: {mask(str(exc))}") from None
        raise
    return RunningBot(app, webhook, watch)


async def _abandon(bot: RunningBot) -> None:
    """Undo a start that failed half-way, quietly: the original error is what matters."""
    with contextlib.suppress(Exception):
        await bot.stop()

