"""The in-process bot state forgets expired keys by itself: bounded memory over months."""

from __future__ import annotations

from bots.common.state import MemoryState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_expired_keys_are_swept_without_being_read() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.set("prefs", "{}")  # no TTL: kept until changed
    for n in range(5000):  # a day of seen updates, each kept for an hour
        assert await state.add(f"update:{n}", "1", ttl_s=3600)
    assert len(state) == 5001
    clock.now += 3601
    await state.add("update:new", "1", ttl_s=3600)  # any write sweeps; nobody read the old ones
    assert len(state) == 2
    assert await state.get("prefs") == "{}" and await state.get("update:new") == "1"
    assert await state.get("update:1") is None


async def test_a_key_set_again_keeps_its_new_expiry() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.set("k", "old", ttl_s=10)
    clock.now += 5
    await state.set("k", "new", ttl_s=100)  # the first expiry must not remove it
    clock.now += 10
    await state.set("other", "x", ttl_s=1)
    assert await state.get("k") == "new"
    for _ in range(1000):  # re-set often: stale heap entries do not pile up
        await state.set("k", "again", ttl_s=100)
    assert len(state._expiries) <= 2 * len(state) + 64
    clock.now += 101
    assert await state.get("k") is None
    assert await state.add("k", "fresh", ttl_s=1)  # expired: free to take again
