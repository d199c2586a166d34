"""One status message per job, edited at most once per ``interval_s`` per chat (the platforms'
flood limits count edits too); newer text replaces what is still waiting, a final edit wins."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bots.common.delivery import RetryLater, cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
_MAX_CLOSED = 10_000  # finished messages remembered, so a late tick cannot reopen one
_MAX_IDLE_CHATS = 1_000

Send = Callable[[Any], Awaitable[None]]


@dataclass
class _Pending:
    payload: Any
    send: Send
    final: bool


@dataclass
class _Chat:
    pending: dict[str, _Pending] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # last payload shown, per message
    next_at: float = 0.0
    task: asyncio.Task[None] | None = None


class ProgressEditor:
    """Coalesces status edits per chat: ``update(chat, message, payload, send)`` never blocks."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._chats: dict[str, _Chat] = {}
        self._closed: OrderedDict[tuple[str, str], None] = OrderedDict()

    def update(
        self, chat: str, message: str, payload: Any, send: Send, *, final: bool = False
    ) -> None:
        """Show ``payload`` on ``message`` soon; after a ``final`` one, ignore later updates."""
        key = (chat, message)
        if key in self._closed:
            return
        if final:
            self._closed[key] = None
            while len(self._closed) > _MAX_CLOSED:
                self._closed.popitem(last=False)
        state = self._chats.get(chat)
        if state is None:
            self._prune()
            state = self._chats[chat] = _Chat()
        state.pending[message] = _Pending(payload, send, final)
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._drain(state), name=f"progress:{chat}")

    async def close(self) -> None:
        """Stop sending; what is still waiting is dropped."""
        await cancel_and_wait([s.task for s in self._chats.values() if s.task is not None])
        self._chats.clear()

    async def idle(self) -> None:
        """Wait until nothing is waiting to be sent (for tests and orderly shutdown)."""
        while True:
            tasks = [s.task for s in self._chats.values() if s.task and not s.task.done()]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    def _prune(self) -> None:
        if len(self._chats) < _MAX_IDLE_CHATS:
            return
        now = asyncio.get_running_loop().time()
        for chat, state in list(self._chats.items()):
            if not state.pending and state.next_at <= now:
                del self._chats[chat]

    async def _drain(self, state: _Chat) -> None:
        loop = asyncio.get_running_loop()
        while state.pending:
            delay = state.next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            message = next(iter(state.pending))
            item = state.pending.pop(message)
            if state.last.get(message) == item.payload:
                continue  # nothing new to show: keep the edit for something that changed
            try:
                await item.send(item.payload)
            except RetryLater as exc:
                # Flood control: wait as told. A final edit must still land; a tick may go.
                if item.final:
                    state.pending.setdefault(message, item)
                state.next_at = loop.time() + max(exc.retry_after, self.interval_s)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("status edit failed (%s: %s)", type(exc).__name__, exc)
            if item.final:
                state.last.pop(message, None)
            else:
                state.last[message] = item.payload
            state.next_at = loop.time() + self.interval_s
