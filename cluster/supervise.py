"""Supervising a process's long-running tasks: an unexpected end is logged with its traceback and
the task restarted with capped exponential backoff, never silent; each part's state is kept in
``Parts``, which /readyz reports (cluster/health.py), so a part that is down is seen there."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Factory = Callable[[], Awaitable[object]]
# What a running part says of itself: None when it works, else why not (a store it retries).
Trouble = Callable[[], str | None]


@dataclass(frozen=True)
class Backoff:
    """Waits between restarts: ``initial_s``, doubling up to ``cap_s``; back to ``initial_s``
    after a run that lasted ``reset_after_s``."""

    initial_s: float = 0.5
    cap_s: float = 30.0
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.cap_s:
            raise ValueError(
                f"backoff needs 0 < initial_s <= cap_s, got {self.initial_s} and {self.cap_s}"
            )


@dataclass
class Part:
    """One supervised part: whether it runs, and if not, why."""

    name: str
    running: bool = False
    why: str | None = "starting"  # None while it runs and says nothing is wrong
    restarts: int = 0
    trouble: Trouble | None = None

    def not_ready(self) -> str | None:
        """None when the part is up and well, else why not."""
        if not self.running:
            return self.why or "not running"
        if self.trouble is not None:
            said = self.trouble()
            if said:
                return said
        return None


@dataclass
class Parts:
    """The supervised parts of one process, by name (a repeated name gets ``#2``, ...)."""

    parts: dict[str, Part] = field(default_factory=dict)

    @contextlib.contextmanager
    def register(self, name: str, trouble: Trouble | None = None) -> Iterator[Part]:
        key, n = name, 1
        while key in self.parts:
            n += 1
            key = f"{name}#{n}"
        part = Part(key, trouble=trouble)
        self.parts[key] = part
        try:
            yield part
        finally:
            self.parts.pop(key, None)

    def states(self) -> dict[str, str]:
        """"ok" or why not, per part."""
        return {name: part.not_ready() or "ok" for name, part in self.parts.items()}


# The process's parts (as prometheus_client has one default registry): supervise() records
# into it and every Probe of the process reports it, unless given others.
PARTS = Parts()


async def supervise(
    name: str,
    factory: Factory,
    stop: asyncio.Event,
    *,
    backoff: Backoff = Backoff(),
    parts: Parts | None = None,
    trouble: Trouble | None = None,
) -> None:
    """Run ``factory()`` until ``stop`` is set. An end before that, by an exception or a plain
    return, is logged at ERROR (with the traceback) and the part started again after a backoff;
    meanwhile the part is recorded down in ``parts`` (default: the process's ``PARTS``).
    ``trouble``: what the running part says of itself (reported by /readyz too).
    Cancelling this coroutine cancels the part."""
    wait = backoff.initial_s
    with (parts if parts is not None else PARTS).register(name, trouble) as part:
        while not stop.is_set():
            began = time.monotonic()
            part.running, part.why = True, None
            try:
                await factory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if stop.is_set():
                    log.warning("%s ended with %r while stopping", name, exc, exc_info=True)
                    return
                why = f"{type(exc).__name__}: {exc}"[:300]
                log.error("%s stopped unexpectedly (%s); restarting in %.1f s", name, why,
                          wait, exc_info=True)
            else:
                if stop.is_set():
                    return
                why = "ended unexpectedly"
                log.error("%s ended though not asked to stop; restarting in %.1f s", name, wait)
            finally:
                part.running = False
            if time.monotonic() - began >= backoff.reset_after_s:
                wait = backoff.initial_s
            part.restarts += 1
            part.why = f"down ({why}); restart {part.restarts} in {wait:.1f} s"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            wait = min(wait * 2, backoff.cap_s)
        part.why = "stopped"
