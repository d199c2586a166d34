"""Running the Discord bot: ``start_bot`` inside a process that already has a client and a
broker (``atelier up``), ``run_bot`` as a process of its own (``atelier bot discord``, over
the shared Redis and database). Commands are synced with Discord only when asked (``sync``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import aiohttp
import discord

from bots.common.logs import hide_in_logs, mask
from bots.common.state import BotState, make_state
from bots.discord.bot import AtelierBot, use_endpoints
from cluster.broker import Broker, connect_broker
from cluster.client import Client
from core.errors import ConfigError
from core.settings import Settings
from storage.blobs import BlobStore
from storage.db import check_migrated, make_engine, session_factory

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


class RunningBot:
    """A started bot; ``stop()`` ends it (unsent deliveries stay pending for the next start)."""

    def __init__(
        self, bot: AtelierBot, task: asyncio.Task[None], own_state: BotState | None
    ) -> None:
        self.bot = bot
        self.task = task
        self._own_state = own_state  # made by start_bot: closed here

    @property
    def username(self) -> str:
        return str(self.bot.user)

    async def stop(self) -> None:
        await self.bot.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)
        if self._own_state is not None:
            await self._own_state.close()
            self._own_state = None


async def start_bot(
    settings: Settings,
    client: Client,
    broker: Broker,
    *,
    state: BotState | None = None,
    sync: bool = False,
    guild_id: int | None = None,
    reconnect: bool = True,
    **options: Any,
) -> RunningBot:
    """Log in, connect to the gateway and wait until the bot is ready (``options`` go to
    ``AtelierBot``). ConfigError, with the token masked, if Discord refuses the token or cannot
    be reached. ``sync``: register the slash commands first (``guild_id``: in that server)."""
    if settings.discord_token is None:
        raise ConfigError("ATELIER_DISCORD_TOKEN is required to run the Discord bot")
    token = settings.discord_token.get_secret_value()
    hide_in_logs(token)
    use_endpoints(settings)
    own_state: BotState | None = None
    if state is None:
        state = own_state = make_state(settings.redis_url if broker.kind == "redis" else None)
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
            await RunningBot(bot, task or asyncio.create_task(asyncio.sleep(0)), own_state).stop()
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
    return RunningBot(bot, task, own_state)


async def run_bot(
    settings: Settings,
    *,
    sync: bool = False,
    guild_id: int | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """The bot as a process of its own, until SIGINT/SIGTERM (or ``stop``). It reaches the
    dispatchers through Redis only, so ATELIER_REDIS_URL is required."""
    if settings.discord_token is None:
        raise ConfigError("ATELIER_DISCORD_TOKEN is required to run the Discord bot")
    if settings.redis_url is None:
        raise ConfigError(
            "ATELIER_REDIS_URL is required to run the Discord bot on its own: it reaches the "
            "dispatchers through Redis (`atelier up` runs the bot in-process without one)"
        )
    engine = make_engine(settings.db_url)
    try:
        check_migrated(engine)
        broker = await connect_broker(settings.redis_url, fallback=False)
        try:
            client = Client(
                settings=settings,
                session_factory=session_factory(engine),
                broker=broker,
                blobs=BlobStore.from_settings(settings),
            )
            stop = stop or _stop_on_signals()
            bot = await start_bot(
                settings, client, broker, sync=sync, guild_id=guild_id, **options
            )
            try:
                await stop.wait()
            finally:
                await bot.stop()
        finally:
            await broker.close()
    finally:
        engine.dispose()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop
