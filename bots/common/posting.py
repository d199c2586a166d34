"""Posting a finished job's result, each part once, for every platform: which messages a
result is made of (``plan``), which of them are out already (``Posted``, kept in the bot state
and the bot's own journal), and what to post instead of a part an earlier process may have
posted (``post_result``). The port only sends one part at a time and says what happened."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import replace

from bots.common import texts
from bots.common.delivery import NotAllowed, NotSent, RetryLater, Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import CONTROL_PART, ChatPort, Destination, Outgoing, Part, Picture
from bots.common.state import POSTED, POSTED_HERE_TTL_S, POSTED_TTL_S, BotState

log = logging.getLogger(__name__)

# Tells this bot process's "sending" notes from those of earlier processes (Posted.sending).
PROCESS_MARK = f"{os.getpid()}-{secrets.token_hex(4)}"
NOT_SENT = "refused"


class Posted:
    """The parts of a job's result already in the chat, kept in the bot state: a delivery
    retried after flood control or a restart posts only what is missing. Parts are named by
    ``plan`` (``"1"``, ``"album0"``, ``"buttons"``...).

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
        show it twice (Telegram has no idempotency key). ``post_result`` then says where to
        find it instead."""
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


class _Marking:
    """``Outgoing`` for one part: the port's news about it, noted in ``Posted``."""

    def __init__(self, posted: Posted, part: str) -> None:
        self.posted = posted
        self.part = part

    async def sending(self) -> None:
        await self.posted.sending(self.part)

    async def refused(self) -> None:
        await self.posted.not_sent(self.part)


class _Quiet:
    """``Outgoing`` for a text part: nothing to note (only uploads can be in doubt)."""

    async def sending(self) -> None:
        return None

    async def refused(self) -> None:
        return None


def plan(
    port: ChatPort, pictures: Sequence[Picture], keyboard: Keyboard, *, as_files: bool
) -> list[Part]:
    """The messages of a result: one picture with its buttons; several in one message with
    them where the platform allows a keyboard there and they fit; else messages of up to
    ``port.album_max`` pictures, then one message with the buttons."""
    count = len(pictures)
    if not count:
        return []
    if count == 1 or (port.keyboard_on_album and count <= port.album_max):
        return [Part("1", tuple(pictures), keyboard, as_files=as_files)]
    step = port.album_max
    parts = [
        Part(f"album{start}", tuple(pictures[start : start + step]), None,
             as_files=as_files, first=start + 1)
        for start in range(0, count, step)
    ]
    parts.append(Part("buttons", (), keyboard, texts.album_buttons_note(count)))
    return parts


async def post_result(
    port: ChatPort,
    to: Destination,
    pictures: Sequence[Picture],
    keyboard: Keyboard,
    *,
    as_files: bool,
    posted: Posted,
    control: Picture | None = None,
) -> None:
    """Post the parts of a result that are not out yet, each marked right after it is. A part
    an earlier process may have posted (``Posted.in_doubt``) becomes a line saying so (with
    its keyboard), never a second copy. ``control``: the control map the images followed,
    posted first as a photo of its own (one in doubt is left out: it is only a preview)."""
    parts = plan(port, pictures, keyboard, as_files=as_files)
    if control is not None and parts:
        parts.insert(0, Part(CONTROL_PART, (control,), None))
    for part in parts:
        if await posted.has(part.name):
            continue
        if not part.pictures:
            await _send(port, to, part, _Quiet())
        elif part.name == CONTROL_PART and await posted.in_doubt(part.name):
            pass
        elif await posted.in_doubt(part.name):
            numbers = list(range(part.first, part.first + len(part.pictures)))
            note = Part(part.name, (), part.keyboard, texts.maybe_posted(numbers))
            await _send(port, to, note, _Quiet())
        else:
            try:
                await _send(port, to, part, _Marking(posted, part.name))
            except (NotSent, RetryLater, Undeliverable):
                await posted.not_sent(part.name)  # the platform answered: it is not out
                raise
        await posted.add(part.name)


async def _send(port: ChatPort, to: Destination, part: Part, outgoing: Outgoing) -> str:
    """``part`` to the chat; where the bot may not post there, to the asker one to one with
    the reason, else the reason on the job's status (then Undeliverable: nowhere to post)."""
    try:
        return await port.send_part(to, part, outgoing)
    except NotAllowed as exc:
        link = await to.gallery() if to.gallery is not None else "/gallery"
        why = texts.no_post_here(exc.place, exc.missing, link)
        if to.owner:
            try:
                return await port.send_part(
                    replace(to, private=True), replace(part, intro=why), outgoing
                )
            except (NotSent, RetryLater, Undeliverable) as dm:
                log.info("cannot send %s:%s the results privately (%s)", port.platform,
                         to.owner, dm)
        if to.status_id is not None:  # editing the bot's own message needs no permission
            try:
                await port.edit(to.chat_id, to.status_id, why, None)
            except Exception as failed:  # best effort: the result is undeliverable anyway
                log.info("could not say why on the status %s (%s)", to.status_id, failed)
        raise Undeliverable(f"{exc} and no private message to the person") from exc
