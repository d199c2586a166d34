"""Keeps Python's cyclic garbage collector off what a service process built while starting, so a
burst of requests does not stop its event loop for a full collection of every module and object.

Why: a serving process (bots, dispatcher, web app) holds hundreds of thousands of long-lived
objects once it runs (its modules, discord.py and aiohttp, SQLAlchemy, Ray, and torch where it
runs workers). A burst of requests allocates enough to trigger a full (oldest generation)
collection, which walks all of them with the event loop stopped: 0.4-0.5 s measured at 50
simultaneous /imagine (bench/discord_load.py), a pause every request in flight shares.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect the garbage there is, then move every object left (what the process built to
    start) into the collector's permanent generation, which later collections do not walk.
    Call once a service process has started. Objects made afterwards are collected as before;
    a frozen object is still freed when its last reference goes (only a cycle among frozen
    objects stays). Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's way", frozen)
    return frozen


@contextlib.contextmanager
def startup_heap_frozen() -> Iterator[int]:
    """``freeze_startup_heap`` while the block runs (a service, once started, until it stops);
    the collector gets the objects back after, so a process that goes on (a test) frees them."""
    frozen = freeze_startup_heap()
    try:
        yield frozen
    finally:
        gc.unfreeze()
