"""Heavy CPU work off the event loop, in a small thread pool of its own: image decoding and
re-encoding, base64 of megabytes. One loop serves the web app, the APIs and the bots; a burst
of big uploads queues here for these threads and never holds up the short blocking calls
(database, files) that ``asyncio.to_thread`` runs in the default executor for every request."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Pillow and zlib release the GIL while they work: one thread per core keeps them busy.
HEAVY_THREADS = max(1, min(4, os.cpu_count() or 1))
# And at a lower priority than the loop's thread (Linux nices each thread on its own): with
# the cores busy, the scheduler lets the loop answer first.
HEAVY_NICE = 10

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                HEAVY_THREADS, thread_name_prefix="atelier-heavy", initializer=_lower_priority
            )
        return _pool


def _lower_priority() -> None:
    # Where threads share their process's priority (not Linux), this lowers the process's:
    # only on Linux, then.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)


async def run_heavy(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in the heavy-work pool (context variables carried over, as
    ``asyncio.to_thread`` does); its result, or what it raised."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await loop.run_in_executor(_executor(), call)
