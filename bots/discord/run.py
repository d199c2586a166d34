"""Starting the Discord bot over a client, a broker and the bots' state the process already has
(built by the composition root, atelier/app.py: ``atelier up``, or ``run_discord_bot`` for
``atelier bot discord``). Commands are synced with Discord only when asked (``sync``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import discord

from bots.common.logs import hide_in_logs, mask
from bots.common.state import BotState
from bots.discord.bot import AtelierBot, use_endpoints
from cluster.broker import Broker
from cluster.client import Client
from cluster.supervise import supervise
from core import metrics
from core.errors import ConfigError
from core.settings import Settings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


# discord.py waits out 429s inside its HTTP clients (REST and interaction webhooks) and says so
# only in a warning of these loggers, worded thus.
_RATE_LIMIT_LOGGERS = ("discord.http", "discord.webhook.async_")
_RATE_LIMIT_WORDS = ("responded with 429", "is rate limited")


class _CountRateLimits(logging.Filter):
    """Counts discord.py's 429 warnings: ``atelier_bot_rate_limited_total{platform="discord"}``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.levelno >= logging.WARNING and any(w in message for w in _RATE_LIMIT_WORDS):
            metrics.BOT_RATE_LIMITED.labels("discord").inc()
        return True


def count_rate_limits() -> None:
    """Install the 429 counter on discord.py's HTTP loggers (once per process)."""
    for name in _RATE_LIMIT_LOGGERS:
        http_log = logging.getLogger(name)
        if not any(isinstance(f, _CountRateLimits) for f in http_log.filters):
            http_log.addFilter(_CountRateLimits())


class RunningBot:
    """A started bot; ``stop()`` ends it (unsent deliveries stay pending for the next start)."""

    def __init__(
        self, bot: AtelierBot, task: asyncio.Task[None], stopping: asyncio.Event | None = None,
    ) -> None:
        self.bot = bot
        self.task = task
        self._stopping = stopping or asyncio.Event()  # tells the gateway's supervisor

    @property
    def username(self) -> str:
        return str(self.bot.user)

    async def stop(self) -> None:
        self._stopping.set()
        await self.bot.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


async def start_bot(
    settings: Settings,
    client: Client,
    broker: Broker,
    *,
    state: BotState,
    sync: bool = False,
    guild_id: int | None = None,
    reconnect: bool = True,
    **options: Any,
) -> RunningBot:
    """Log in, connect to the gateway and wait until the bot is ready (``options`` go to
    ``AtelierBot``). ConfigError, with the token masked, if Discord refuses the token or cannot
    be reached. ``sync``: register the slash commands first (``guild_id``: in that server).
    ``state`` stays the caller's (atelier/app.py opens and closes it)."""
    if settings.discord_token is None:
        raise ConfigError("ATELIER_DISCORD_TOKEN is required to run the Discord bot")
    token = settings.discord_token.get_secret_value()
    hide_in_logs(token)
    count_rate_limits()
    use_endpoints(settings)
    bot = AtelierBot(settings, client, broker, state, **options)
    task: asyncio.Task[None] | None = None
    try:
        await bot.login(token)
        if sync:
            await bot.sync_commands(guild_id)
        task = asyncio.create_task(bot.connect(reconnect=reconnect), name="discord-gateway")
        ready = asyncio.create_task(bot.wait_until_ready())
        done, _ = await asyncio.wait({task, ready}, timeout=READY_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            if task in done:
                task.result()  # the gateway's own error
            raise ConfigError(
                f"the Discord gateway at {settings.discord_gateway_url} "
                f"(ATELIER_DISCORD_GATEWAY_URL) did not get ready within {READY_TIMEOUT_S:.0f} s"
            )
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await RunningBot(bot, task or asyncio.create_task(asyncio.sleep(0))).stop()
        if isinstance(exc, discord.LoginFailure):
            raise ConfigError(f"Discord refused ATELIER_DISCORD_TOKEN ({mask(str(exc))})") from None
        if isinstance(exc, aiohttp.ClientError | OSError):
            raise ConfigError(
                f"cannot reach Discord at {settings.discord_api_base_url} "
                f"(ATELIER_DISCORD_API_BASE_URL): {mask(str(exc))}"
            ) from None
        if isinstance(exc, discord.DiscordException):
            raise ConfigError(f"Discord refused to start the bot: {mask(str(exc))}") from None
        raise
    log.info("discord bot %s: connected to %d servers", bot.user, len(bot.guilds))
    # Supervised from now on: a gateway connection discord.py gave up on is logged (with its
    # traceback) and made again, never left to end silently.
    stopping = asyncio.Event()
    connections = iter([task])
    gateway = asyncio.create_task(supervise(
        "discord gateway", lambda: next(connections, None) or bot.connect(reconnect=reconnect),
        stopping,
    ), name="discord-gateway-supervised")
    return RunningBot(bot, gateway, stopping)
