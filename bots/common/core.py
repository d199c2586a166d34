"""``ChatCore``: what the shared chat use-cases work with (the cluster client, the bot state,
preferences, the status editor) plus the platform's port. One per running bot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from bots.common import texts
from bots.common.delivery import DeliveryLoop, cancel_and_wait
from bots.common.journal import open_posted_journal
from bots.common.port import ChatPort, Who
from bots.common.prefs import PrefsStore
from bots.common.progress import ProgressEditor
from bots.common.state import BotState, MemoryState
from cluster.client import Client
from core.errors import AtelierError
from core.jobs import Requester
from core.settings import Settings
from core.styles import StyleRegistry

log = logging.getLogger(__name__)


@dataclass
class ChatCore:
    """The chat core's collaborators; the adapter builds it with its port."""

    settings: Settings
    client: Client
    state: BotState
    port: ChatPort
    editor: ProgressEditor
    styles: StyleRegistry
    prefs: PrefsStore = field(init=False)
    # Consumes this platform's delivery stream with ``bots.common.jobs.deliver``.
    delivery: DeliveryLoop | None = None
    # Per job: the task following its progress.
    watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Other tasks of the core (following in-flight jobs again after a start).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # The result parts this bot posted (``Posted.here``): a retry never posts one twice, even
    # when the state failed to record it. Default: the journal under the data folder
    # (``bots.common.journal``), which a restarted process reads back.
    posted_here: MemoryState | None = None

    def __post_init__(self) -> None:
        self.prefs = PrefsStore(self.state, self.platform)
        if self.posted_here is None:
            self.posted_here = open_posted_journal(self.settings.data_dir, self.platform)

    @property
    def platform(self) -> str:
        return self.port.platform

    def start(self) -> None:
        """Start delivering (call once the platform connection is up); ``jobs.start`` also
        follows the jobs in flight again."""
        if self.delivery is not None:
            self.delivery.start()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` in a task that ``stop`` ends."""
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def stop_reading(self) -> None:
        """Take no more deliveries (``stop`` waits for those under way)."""
        if self.delivery is not None:
            self.delivery.stop_reading()

    async def stop(self) -> None:
        """Finish deliveries under way, stop following jobs and editing statuses."""
        if self.delivery is not None:
            await self.delivery.stop()
        await cancel_and_wait([*self.tasks, *self.watchers.values()])
        await self.editor.close()
        if self.posted_here is not None:
            await self.posted_here.close()

    def plain_requester(self, user_id: str | int) -> Requester:
        """A requester only to look an account up (balance, history): no channel context."""
        return Requester(platform=self.platform, platform_user_id=str(user_id))

    async def requester(self, who: Who) -> Requester:
        """The person asking, with the NSFW allowance of where they ask."""
        if who.private:
            nsfw = (await self.prefs.user(who.user_id)).nsfw
        else:
            nsfw = (await self.prefs.group(who.chat_id)).nsfw
        return Requester(
            platform=self.platform,
            platform_user_id=who.user_id,
            display_name=who.name or who.user_id,
            nsfw_allowed=nsfw,
        )

    async def credits_left(self, user_id: str | int) -> int | None:
        """The total a person can spend now, or None if it cannot be read at the moment."""
        try:
            return (await self.client.accounts.balance(self.plain_requester(user_id))).total
        except Exception as exc:
            log.warning("could not read the balance of %s:%s (%s)", self.platform, user_id, exc)
            return None

    async def upscale_cap(self, user_id: str | int, model: str | None) -> int:
        """The largest side an upscale may reach for whoever pays (their tier) on ``model``."""
        payer = await self.client.accounts.account(self.plain_requester(user_id))
        return min(
            self.settings.limits.max_side,
            self.settings.tier(payer.tier).max_side,
            self.client.models.get(model).max_width,
        )

    async def error_text(
        self, user_id: str | int, exc: AtelierError, *, button: bool = False
    ) -> str:
        """One line: what is wrong, what to do (``button``: after a press), the credits left."""
        return texts.error_line(exc, await self.credits_left(user_id), button=button)
