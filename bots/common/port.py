"""The port between the chat core (``bots.common``) and a chat platform: what an adapter
(``bots.telegram``, ``bots.discord``) implements so the shared use-cases can talk to people.

An adapter's whole job is two-way translation:

- platform event -> use-case: build a ``Who`` (person + place) or a ``Press`` (a button press)
  and call ``bots.common.jobs`` / ``actions`` / ``account``. Use-cases return what to say
  (``Say``, ``Answer``); the adapter shows it natively (a reply, a toast or an ephemeral
  message). A button press is answered by the adapter with the returned ``Answer``, since only
  it holds the platform's press object (Telegram's callback query, Discord's interaction).
  Where a platform answers an event through the event itself (Discord's interaction), the
  adapter puts its handle in ``Who.via``; the use-cases hand it back to every port call made
  for that person (``via=``), so the port needs no memory of "the event being handled".
- "send / edit / delete this one message" -> platform calls: the ``ChatPort`` methods below,
  called by the use-cases. Ids (chats, messages, users) are strings; keyboards are
  ``bots.common.keyboards.Keyboard`` (rows of label + button data), rendered natively by the
  adapter (split a row longer than the platform allows). A result is posted part by part
  (``send_part``): which parts a result has, which are out already (so a restart mid-delivery
  posts each once), and the job's owner, status message and captions are the chat core's
  (``bots.common.posting``, ``bots.common.jobs.deliver``), never the adapter's.

Lifecycle: build a ``bots.common.core.ChatCore`` with the port and a ``DeliveryLoop`` whose
handler is ``bots.common.jobs.deliver``; call ``bots.common.jobs.start(core)`` once connected
(it delivers, and follows the jobs in flight again after a restart), and on shutdown
``core.stop_reading()`` then ``await core.stop()``.

Use-cases an adapter calls: ``jobs.imagine`` (a prompt, optionally with a photo's bytes;
or its two halves, ``jobs.check`` then ``jobs.start_checked``, where the platform must choose
before answering whether the answer is public; ``jobs.refuse`` then says a refusal where
refusals go), ``jobs.preview`` (plain text: a priced preview with an Imagine button),
``actions.on_press`` (any button), and ``account.*`` (credits, gallery, history, cancel, link,
styles, settings). Everything is checked and priced before anything is posted: a refusal is
one line.

Error contract for ``edit`` and ``send_part`` (the delivery path): raise
``bots.common.delivery.RetryLater`` when the platform says "too many requests" (nothing was
sent), ``Undeliverable`` when the chat is gone or the bot may no longer write there,
``NotSent`` when the platform answered that it refused the message for another reason (it is
surely not in the chat), ``NotAllowed`` (an ``Undeliverable``) where the bot may not post in
the chat: the chat core then sends the part to the asker one to one (``Destination.private``),
else says why on the job's status. Anything else (a lost connection: the part may be out)
is retried a few times by the delivery loop, and a later process says where to find it
instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from bots.common.keyboards import Keyboard


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
    # The adapter's handle on the event being answered (Discord: the interaction, with
    # whether its deferred "thinking" message is still up), passed back to the port as
    # ``via``; None where the platform answers in the chat (Telegram).
    via: object = None


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


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a finished job's result goes, as its delivery event says (the port never reads
    the job back): the chat, the asker, the job's status message (on Discord it names the
    interaction whose webhook may still post there)."""

    chat_id: str
    owner: str = ""  # the asker's platform user id; "" when unknown
    status_id: str | None = None
    # The asker's gallery link (a line of text), for images the platform cannot take.
    gallery: Callable[[], Awaitable[str]] | None = None
    # To the asker one to one (their DMs) instead of the chat (where the bot may not post).
    private: bool = False


# The part that shows a ControlNet result's control map before its images (one picture, no
# keyboard; not one of the numbered images).
CONTROL_PART = "control"


@dataclass(frozen=True, slots=True)
class Part:
    """One message of a result (``bots.common.posting`` plans them): up to
    ``ChatPort.album_max`` pictures with their captions, or none and ``text``; the keyboard
    under it (None: none). ``as_files``: the pictures go as files (PNG with its infotext),
    not compressed photos. ``first``: the number (1-based) of its first picture in the
    whole result."""

    name: str
    pictures: tuple[Picture, ...] = ()
    keyboard: Keyboard | None = None
    text: str = ""
    as_files: bool = False
    first: int = 1
    intro: str = ""  # a line before the rest (why it comes here and not to the chat)


class Outgoing(Protocol):
    """What a port tells while a part goes out, for the posted-parts journal."""

    async def sending(self) -> None:
        """The upload starts now (after any wait for its turn)."""
        ...

    async def refused(self) -> None:
        """The platform answered "not now" to a try the port makes again itself."""
        ...


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

    @property
    def album_max(self) -> int:
        """The most pictures one message carries."""
        ...

    @property
    def keyboard_on_album(self) -> bool:
        """A message of several pictures can carry a keyboard (Discord); else the keyboard of
        a result of several pictures goes in a message of its own (Telegram)."""
        ...

    async def send(
        self,
        chat_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        reply_to: str | None = None,
        via: object = None,
        private: bool = False,
    ) -> str | None:
        """Post a message (a status, a refusal, a picker); return its message id. ``via``:
        the event being answered (``Who.via``). ``private``: for the person alone where
        the platform can (Discord's ephemeral answer; its id is not needed: None)."""
        ...

    async def edit(
        self,
        chat_id: str,
        message_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        via: object = None,
    ) -> None:
        """Replace a message's text and keyboard (``None``: no keyboard). An edit that changes
        nothing is not an error. Raise RetryLater under flood control."""
        ...

    async def edit_keyboard(
        self, chat_id: str, message_id: str, keyboard: Keyboard, *, via: object = None
    ) -> None:
        """Replace only a message's keyboard (turning a page of a picker)."""
        ...

    async def delete(self, chat_id: str, message_id: str) -> None:
        """Remove a message; best effort (no error when it cannot)."""
        ...

    async def send_private(self, user_id: str, text: str) -> bool:
        """Message the person one to one; False when the platform does not let the bot."""
        ...

    async def is_admin(self, chat_id: str, user_id: str, *, via: object = None) -> bool:
        """True when the person may change the chat's (group's, server's) settings."""
        ...

    async def show_working(self, chat_id: str) -> None:
        """A "working on it" sign while a job renders (Telegram's upload_photo action);
        best effort, called every few seconds. May do nothing."""
        ...

    async def send_part(self, to: Destination, part: Part, outgoing: Outgoing) -> str:
        """Post one part of a result to ``to``; return its (first) message id. Call
        ``outgoing.sending`` at the last moment before an upload and ``outgoing.refused``
        when the platform refuses a try the port repeats itself. Errors: see above."""
        ...
