"""The port between the chat core (``bots.common``) and a chat platform: what an adapter
(``bots.telegram``, ``bots.discord``) implements so the shared use-cases can talk to people.

An adapter's whole job is two-way translation:

- platform event -> use-case: build a ``Who`` (person + place) or a ``Press`` (a button press)
  and call ``bots.common.jobs`` / ``actions`` / ``account``. Use-cases return what to say
  (``Say``, ``Answer``); the adapter shows it natively (a reply, a toast or an ephemeral
  message). A button press is answered by the adapter with the returned ``Answer``, since only
  it holds the platform's press object (Telegram's callback query, Discord's interaction).
- "show this status / post these images with these buttons" -> platform calls: the
  ``ChatPort`` methods below, called by the use-cases. Ids (chats, messages, users) are
  strings; keyboards are ``bots.common.keyboards.Keyboard`` (rows of label + button data),
  rendered natively by the adapter (split a row longer than the platform allows).

Lifecycle: build a ``bots.common.core.ChatCore`` with the port and a ``DeliveryLoop`` whose
handler is ``bots.common.jobs.deliver``; call ``bots.common.jobs.start(core)`` once connected
(it delivers, and follows the jobs in flight again after a restart), and on shutdown
``core.stop_reading()`` then ``await core.stop()``.

Use-cases an adapter calls: ``jobs.imagine`` (a prompt, optionally with a photo's bytes;
or its two halves, ``jobs.check`` then ``jobs.start_checked``, where the platform must choose
before answering whether the answer is public: a refusal then goes to the asker alone),
``jobs.preview`` (plain text: a priced preview with an Imagine button), ``actions.on_press``
(any button), and ``account.*`` (credits, gallery, history, cancel, link, styles, settings).
Everything is checked and priced before anything is posted: a refusal is one line.

Error contract for ``edit`` and ``post_images`` (the delivery path): raise
``bots.common.delivery.RetryLater`` when the platform says "too many requests" (nothing was
sent), ``Undeliverable`` when the chat is gone or the bot may no longer write there. Anything
else is retried a few times by the delivery loop.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bots.common.keyboards import Keyboard
from bots.common.state import POSTED, POSTED_HERE_TTL_S, POSTED_TTL_S, BotState


@dataclass(frozen=True, slots=True)
class Who:
    """A person and the chat they write in (the adapter fills it from the platform event)."""

    user_id: str
    chat_id: str
    private: bool  # a one-to-one chat with the bot (Telegram private chat, Discord DM)
    name: str = ""
    # The person's message being answered: the status of a job quotes it where the platform
    # does that (Telegram groups); None for none.
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Press:
    """A button press: who pressed, the message the button is on, the button's data."""

    who: Who
    data: str
    press_id: str  # unique per press (Telegram query id, Discord interaction id): one job each
    message_id: str | None = None  # the message carrying the button


@dataclass(frozen=True, slots=True)
class Say:
    """A reply to post: text and an optional keyboard."""

    text: str
    keyboard: Keyboard | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to a button press: a short toast (Telegram) / ephemeral line (Discord);
    ``alert``: it is a refusal the person must read (a popup on Telegram)."""

    text: str | None = None
    alert: bool = False


@dataclass(frozen=True, slots=True)
class Picture:
    """One image of a result, ready to post."""

    png: bytes
    filename: str
    caption: str


# Tells this bot process's "sending" notes from those of earlier processes (Posted.sending).
PROCESS_MARK = f"{os.getpid()}-{secrets.token_hex(4)}"
NOT_SENT = "refused"


class Posted:
    """The parts of a job's result already in the chat, kept in the bot state: a delivery
    retried after flood control or a restart posts only what is missing. Adapters name the
    parts they post (``"1"``, ``"album0"``, ``"buttons"``...) and check them before posting.

    ``here``: the same marks in this process's memory, written first. A part is out once the
    platform said so; when the state cannot record it then (Redis down, or back empty after a
    restart without persistence), the retry must still not post it a second time."""

    def __init__(
        self, state: BotState, platform: str, job_id: str, here: BotState | None = None
    ) -> None:
        self.state = state
        self.platform = platform
        self.job_id = job_id
        self.here = here

    def _key(self, part: str) -> str:
        return POSTED.format(platform=self.platform, job=self.job_id, part=part)

    async def has(self, part: str) -> bool:
        if self.here is not None and await self.here.get(self._key(part)) is not None:
            return True
        return await self.state.get(self._key(part)) is not None

    async def add(self, part: str) -> None:
        if self.here is not None:
            await self.here.set(self._key(part), "1", POSTED_HERE_TTL_S)
        await self.state.set(self._key(part), "1", POSTED_TTL_S)

    async def in_doubt(self, part: str) -> bool:
        """An earlier bot process began uploading ``part`` (``sending``) and was never heard
        from again: it may have died between the platform taking the upload and the answer
        being recorded, so ``part`` may be in the chat already, and posting it again could
        show it twice (Telegram has no idempotency key). The adapter then says where to find
        it instead."""
        if self.here is None:
            return False
        earlier = await self.here.get(self._key(part) + ":sending")
        return earlier not in (None, PROCESS_MARK, NOT_SENT)

    async def sending(self, part: str) -> None:
        """Note (in ``here``, the bot's journal) that ``part`` goes out now: called at the last
        moment before the upload, after any wait for its turn."""
        if self.here is not None:
            await self.here.set(self._key(part) + ":sending", PROCESS_MARK, POSTED_HERE_TTL_S)

    async def not_sent(self, part: str) -> None:
        """The platform answered that ``part`` was refused (flood control, a bad request): a
        later process may post it without doubt."""
        if self.here is not None:
            await self.here.set(self._key(part) + ":sending", NOT_SENT, POSTED_HERE_TTL_S)


class ChatPort(Protocol):
    """What a platform adapter implements for the chat core."""

    @property
    def platform(self) -> str:
        """The platform's name: the delivery stream (``atelier:deliveries:{platform}``) and the
        accounts' identity namespace, e.g. ``"telegram"``."""
        ...

    @property
    def photo_max_bytes(self) -> int:
        """Images larger than this are sent as files (or as the platform allows)."""
        ...

    async def send(
        self,
        chat_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        reply_to: str | None = None,
    ) -> str:
        """Post a message (a status, a refusal, a picker); return its message id."""
        ...

    async def edit(
        self, chat_id: str, message_id: str, text: str, keyboard: Keyboard | None = None
    ) -> None:
        """Replace a message's text and keyboard (``None``: no keyboard). An edit that changes
        nothing is not an error. Raise RetryLater under flood control."""
        ...

    async def edit_keyboard(self, chat_id: str, message_id: str, keyboard: Keyboard) -> None:
        """Replace only a message's keyboard (turning a page of a picker)."""
        ...

    async def delete(self, chat_id: str, message_id: str) -> None:
        """Remove a message; best effort (no error when it cannot)."""
        ...

    async def send_private(self, user_id: str, text: str) -> bool:
        """Message the person one to one; False when the platform does not let the bot."""
        ...

    async def is_admin(self, chat_id: str, user_id: str) -> bool:
        """True when the person may change the chat's (group's, server's) settings."""
        ...

    async def show_working(self, chat_id: str) -> None:
        """A "working on it" sign while a job renders (Telegram's upload_photo action);
        best effort, called every few seconds. May do nothing."""
        ...

    async def post_images(
        self,
        chat_id: str,
        pictures: Sequence[Picture],
        keyboard: Keyboard,
        *,
        as_files: bool,
        posted: Posted,
    ) -> None:
        """Post a finished job's images with the result keyboard, each part once (skip parts
        ``posted`` has, ``posted.add`` each right after it is out). ``as_files``: as files
        (PNG with its infotext), not compressed photos."""
        ...
