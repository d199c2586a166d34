"""core/heap.py: what a service process built while starting goes where the garbage collector's
full collections do not walk it, after the garbage there was is collected; what it makes later is
collected as before; and the block form gives the objects back."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from core.heap import freeze_startup_heap, startup_heap_frozen


class Node:
    """A container the collector tracks; two of them referring to each other are a cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> weakref.ref[Node]:
    """A reference cycle nothing else holds (only the collector frees it); a weak reference
    to one of its two nodes says whether it is gone."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _visible(obj: object) -> bool:
    """Whether the collector's generations (what a collection walks) hold ``obj``."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _give_back() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session keeps its collector as it was


def test_garbage_first_then_what_lives_is_frozen() -> None:
    garbage = _cycle()  # unreachable before the call: collected, not frozen for good
    alive = Node()
    assert _visible(alive)

    frozen = freeze_startup_heap()

    assert garbage() is None
    # A frozen object is still freed when its last reference goes: never more, maybe fewer.
    assert 0 < gc.get_freeze_count() <= frozen
    assert not _visible(alive)  # a full collection no longer walks it


def test_what_is_made_after_is_collected_as_before() -> None:
    freeze_startup_heap()
    later = _cycle()
    assert later() is not None
    gc.collect()
    assert later() is None


def test_the_block_gives_the_objects_back() -> None:
    alive = Node()
    with startup_heap_frozen() as frozen:
        assert frozen > 0
        assert not _visible(alive)
    assert gc.get_freeze_count() == 0
    assert _visible(alive)
