"""``AtelierBot``: the discord.py ``commands.Bot`` with its collaborators passed in (never
global), a Cog per feature, the persistent button route and the delivery loop started in
``setup_hook`` and stopped in ``close``."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bots.common import actions, jobs, texts
from bots.common.delivery import DeliveryLoop
from bots.common.port import Press
from bots.common.progress import DEFAULT_INTERVAL_S, ProgressEditor
from bots.common.state import BotState
from bots.discord.chat import DiscordCore, ServerPrefs, who
from bots.discord.components import ChatButton
from bots.discord.hooks import Hooks
from bots.discord.port import PLATFORM, DiscordPort
from cluster.broker import Broker
from cluster.client import Client
from cluster.events import JobEvent
from cluster.purchases import PurchaseService
from core.settings import Settings
from core.shop import load_shop
from core.styles import StyleRegistry

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def use_endpoints(settings: Settings) -> None:
    """Point discord.py at the REST API and gateway named in the settings. discord.py keeps
    both as class attributes, so this is process-wide (one Discord bot per process)."""
    discord.http.Route.BASE = settings.discord_api_base_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


class AtelierTree(app_commands.CommandTree[Any]):
    """The command tree with one place for failures: log them, tell the person something."""

    async def on_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        name = interaction.command.name if interaction.command else "?"
        log.error("command /%s failed", name, exc_info=error)
        await say(interaction, texts.UNEXPECTED)


class AtelierBot(commands.Bot):
    """The Discord bot. ``clock`` tells the time for the interaction-token rules (tests move
    it forward); ``options`` go to ``commands.Bot`` (``guild_ready_timeout`` in tests). It
    consumes the Discord delivery stream as ``consumer``."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        broker: Broker,
        state: BotState,
        *,
        styles: StyleRegistry | None = None,
        clock: Clock = utcnow,
        consumer: str = "discord-bot",
        progress_interval_s: float = DEFAULT_INTERVAL_S,
        startup_claim_idle_ms: int = 0,
        **options: Any,
    ) -> None:
        # Interactions arrive without any intent; GUILDS keeps channels and roles known, for
        # permissions and NSFW flags. No privileged intent is needed.
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=AtelierTree,
            # Prompts are echoed in statuses, captions and refusals: nothing a person typed
            # may ping anyone. A message that means to ping the asker says so itself.
            allowed_mentions=discord.AllowedMentions.none(),
            **options,
        )
        self.settings = settings
        self.client = client
        self.broker = broker
        self.state = state
        self.styles = styles or client.styles
        self.clock = clock
        self.port = DiscordPort(self, Hooks(state, clock))
        self.purchases = PurchaseService(settings, client.sessions, load_shop(settings))
        self._stopping: asyncio.Task[None] | None = None  # the one ``close`` that runs
        self.core = DiscordCore(
            settings=settings,
            client=client,
            state=state,
            port=self.port,
            editor=ProgressEditor(progress_interval_s),
            styles=self.styles,
            bot=self,
        )
        self.core.prefs = ServerPrefs(state, self)

        async def handle(event: JobEvent) -> None:
            await jobs.deliver(self.core, event)

        self.core.delivery = DeliveryLoop(
            broker,
            PLATFORM,
            consumer,
            handle,
            state,
            startup_claim_idle_ms=startup_claim_idle_ms,
            mark_delivered=client.mark_delivered,
        )

    async def setup_hook(self) -> None:
        from bots.discord.cogs import ALL

        # Every press of one of our buttons, on any message ever sent, routes by custom_id.
        self.add_dynamic_items(ChatButton)
        for cog in ALL:
            await self.add_cog(cog(self))
        # Deliver (posting needs only REST, ready once logged in) and follow again the jobs
        # in flight that a previous run was following.
        jobs.start(self.core)

    async def close(self) -> None:
        """Stop taking deliveries, finish those under way, then disconnect (what was not
        posted stays pending for the next start). Once: discord.py calls ``close`` again
        itself when the gateway connection ends without ``reconnect``; later calls wait for
        the first."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._close_once(), name="discord-close")
        await asyncio.shield(self._stopping)

    async def _close_once(self) -> None:
        self.core.stop_reading()
        await self.core.stop()
        await super().close()

    async def on_press(self, interaction: discord.Interaction[Any], data: str) -> None:
        """A press of one of our buttons (``data``: the common button data): acknowledged at
        once, run by the chat core, its answer shown to the presser only."""
        if not await acknowledge(interaction):
            return
        message_id = str(interaction.message.id) if interaction.message is not None else None
        press = Press(who(interaction), data, str(interaction.id), message_id)
        answer = await actions.on_press(self.core, press)
        if answer.text:
            await say(interaction, answer.text)

    async def sync_commands(self, guild_id: int | None = None) -> int:
        """Register the slash commands with Discord: in one server (at once) or globally
        (rate-limited by Discord to 200 creations a day per server, so only on request)."""
        if guild_id is None:
            synced = await self.tree.sync()
        else:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        where = f"to server {guild_id}" if guild_id else "globally"
        log.info("synced %d commands %s", len(synced), where)
        return len(synced)


async def acknowledge(interaction: discord.Interaction[Any], **defer: Any) -> bool:
    """Defer ``interaction`` (Discord wants an answer within 3 s); False when Discord says it
    was already answered or is unknown (the same interaction delivered twice, or too late)."""
    try:
        await interaction.response.defer(**defer)
    except discord.InteractionResponded:
        return False
    except discord.HTTPException as exc:
        # 40060: already acknowledged; 10062: unknown (expired) interaction.
        if exc.code in (40060, 10062):
            log.info("interaction %s not answered: %s", interaction.id, exc.text)
            return False
        raise
    return True


async def say(interaction: discord.Interaction[Any], text: str, *, ephemeral: bool = True) -> None:
    """One line to the person, however far the interaction got (answered, deferred or not)."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=ephemeral)
        else:
            await interaction.response.send_message(text, ephemeral=ephemeral)
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s", interaction.id, exc)
