"""A ControlNet result's control map as a part of its own (``bots.common.posting``): posted
first, without the buttons, once; one an earlier process may have posted is left out (only a
preview), and the images still go out."""

from __future__ import annotations

from bots.common.port import CONTROL_PART, Destination, Picture
from bots.common.posting import Posted, post_result
from bots.common.state import POSTED, MemoryState
from tests.bots.test_posting import KEYS, ListPort, pictures

MAP = Picture(b"edges", "control.png", "Control map")


async def test_the_map_goes_first_and_once() -> None:
    port = ListPort(keyboard_on_album=True)
    posted = Posted(MemoryState(), port.platform, "job3", here=MemoryState())
    await post_result(port, Destination("42"), pictures(2), KEYS, as_files=True, posted=posted,
                      control=MAP)
    first, images = port.sent
    assert (first.name, first.pictures, first.keyboard) == (CONTROL_PART, (MAP,), None)
    assert not first.as_files  # a small photo, even where the images go as files
    assert images.keyboard == KEYS and len(images.pictures) == 2
    await post_result(port, Destination("42"), pictures(2), KEYS, as_files=True, posted=posted,
                      control=MAP)
    assert len(port.sent) == 2


async def test_a_map_in_doubt_is_left_out() -> None:
    port = ListPort()
    here = MemoryState()
    key = POSTED.format(platform=port.platform, job="job4", part=CONTROL_PART) + ":sending"
    await here.set(key, "4242-deadbeef", 3600)
    posted = Posted(MemoryState(), port.platform, "job4", here=here)
    await post_result(port, Destination("42"), pictures(1), KEYS, as_files=False, posted=posted,
                      control=MAP)
    (only,) = port.sent
    assert only.name == "1" and only.pictures and only.keyboard == KEYS
    assert await posted.has(CONTROL_PART)
