"""A result's parts, each posted once (``bots.common.posting``), over the real state classes
and a platform kept in a list: the parts a platform's shape makes, a retry after a refusal
posting only what is missing, and a part an earlier process may have posted said, not
posted twice."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bots.common import texts
from bots.common.delivery import NotSent
from bots.common.keyboards import Key, Keyboard
from bots.common.port import Destination, Outgoing, Part, Picture
from bots.common.posting import NOT_SENT, Posted, plan, post_result
from bots.common.state import POSTED, MemoryState

KEYS: Keyboard = ((Key("V1", "v:1"),),)


@dataclass
class ListPort:
    """A platform that keeps what it was sent; refuses the part named in ``refuse`` once."""

    platform: str = "listchat"
    photo_max_bytes: int = 10 * 2**20
    album_max: int = 10
    keyboard_on_album: bool = False
    sent: list[Part] = field(default_factory=list)
    refuse: str | None = None

    async def send_part(self, to: Destination, part: Part, outgoing: Outgoing) -> str:
        await outgoing.sending()
        if part.name == self.refuse:
            self.refuse = None
            raise NotSent(f"refused {part.name}")
        self.sent.append(part)
        return str(len(self.sent))


def pictures(count: int) -> list[Picture]:
    return [Picture(b"png%d" % n, f"{n}.png", f"image {n}") for n in range(1, count + 1)]


def test_the_parts_follow_the_platforms_shape() -> None:
    albums = ListPort()  # Telegram-like: no keyboard under an album
    assert [p.name for p in plan(albums, pictures(1), KEYS, as_files=False)] == ["1"]
    parts = plan(albums, pictures(12), KEYS, as_files=True)
    assert [p.name for p in parts] == ["album0", "album10", "buttons"]
    assert [len(p.pictures) for p in parts] == [10, 2, 0]
    assert parts[1].first == 11 and parts[0].keyboard is None and parts[2].keyboard == KEYS
    assert parts[2].text == texts.album_buttons_note(12) and parts[0].as_files
    one_message = ListPort(keyboard_on_album=True)  # Discord-like
    (only,) = plan(one_message, pictures(4), KEYS, as_files=False)
    assert only.name == "1" and len(only.pictures) == 4 and only.keyboard == KEYS


async def test_a_refused_part_is_retried_and_what_is_out_is_not_posted_again() -> None:
    port = ListPort(refuse="album10")
    here, state = MemoryState(), MemoryState()
    posted = Posted(state, port.platform, "job1", here=here)
    to = Destination("42", "7")
    with pytest.raises(NotSent):
        await post_result(port, to, pictures(12), KEYS, as_files=False, posted=posted)
    assert [p.name for p in port.sent] == ["album0"]
    # Refused: surely not in the chat, so a later process posts it without doubt.
    sending = POSTED.format(platform=port.platform, job="job1", part="album10") + ":sending"
    assert await here.get(sending) == NOT_SENT
    # The retry (another process: the refusal was noted, so it posts without doubt).
    again = Posted(state, port.platform, "job1", here=here)
    await post_result(port, to, pictures(12), KEYS, as_files=False, posted=again)
    assert [p.name for p in port.sent] == ["album0", "album10", "buttons"]
    await post_result(port, to, pictures(12), KEYS, as_files=False, posted=again)
    assert len(port.sent) == 3


async def test_a_part_an_earlier_process_began_is_said_not_posted_twice() -> None:
    port = ListPort()
    here, state = MemoryState(), MemoryState()
    posted = Posted(state, port.platform, "job2", here=here)
    # An earlier process noted the upload going out, then died before hearing back.
    key = POSTED.format(platform=port.platform, job="job2", part="1") + ":sending"
    await here.set(key, "4242-deadbeef", 3600)
    assert await posted.in_doubt("1")
    await post_result(port, Destination("42"), pictures(1), KEYS, as_files=False, posted=posted)
    (note,) = port.sent
    assert note.pictures == () and note.text == texts.maybe_posted([1]) and note.keyboard == KEYS
    assert await posted.has("1")
