"""``JournalState``: the bot's own record of the result parts it posted, on its local disk.

A photo is out once the platform answered; the bot then marks it (``Posted.add``) in the shared
state (Redis) and here. Redis can miss that mark: frozen or restarting at that moment, or back
empty after a restart without persistence. If the bot process is then killed too, its next
run would post the photo again. The journal closes that gap on one box: each mark is one
``write`` to an append-only file (fsync'd, so a machine crash keeps it too) before ``add``
returns, and a new process reads the file back at start.

Lines are ``key<TAB>value<TAB>expiry`` (wall-clock seconds, empty for none); the last line of
a key wins, and expired lines are dropped when the file is rewritten (at start, and whenever
it has grown to several times what is live). Bot processes on one box may share a file: each
line goes out in one ``O_APPEND`` write, and rewriting takes an exclusive ``flock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bots.common.state import MemoryState

log = logging.getLogger(__name__)

COMPACT_FLOOR = 4096  # lines appended before a rewrite is considered


def posted_journal_path(data_dir: Path, platform: str) -> Path:
    return data_dir / "bot" / f"posted-{platform}.journal"


class JournalState(MemoryState):
    """A ``MemoryState`` (wall clock) whose writes also go to ``path`` and are read back when
    a process opens it again. The file work of ``set`` (a lock another process may hold while
    it rewrites, the write, the fsync, a rewrite) runs in worker threads: the event loop is
    shared by every bot and the web app."""

    def __init__(
        self, path: Path, *, fsync: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(clock=clock)
        self.path = path
        self._fsync = fsync
        self._appended = 0
        # One file operation of this process at a time (they run in worker threads).
        self._io = threading.Lock()
        # Keys set while a rewrite runs: what the rewrite read back must not undo them.
        self._set_meanwhile: set[str] | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with self._locked(fcntl.LOCK_EX):
            found = self._read()
            self._merge(found)
            self._rewrite(found)

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        """``flock`` the file now at ``path``: another process may have rewritten it (a new
        file) since this one opened it, and a lock on the old one would keep out no one."""
        while True:
            fcntl.flock(self._fd, how)
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                break
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read(self) -> dict[str, tuple[str, float | None]]:
        """Every key in the file with its last line's value and expiry (expired ones too)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        found: dict[str, tuple[str, float | None]] = {}
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue  # a line cut short by a crash mid-write
            key, value, expiry = parts
            try:
                found[key] = (value, float(expiry) if expiry else None)
            except ValueError:
                continue
        return found

    def _merge(
        self, found: dict[str, tuple[str, float | None]], skip: set[str] | None = None
    ) -> None:
        """Take what the file holds (what other processes appended too) into memory."""
        now = self._clock()
        for key, (value, expires) in found.items():
            if skip and key in skip:
                continue
            if expires is None or expires > now:
                self._store(key, value, expires)
            else:
                self._data.pop(key, None)

    def _rewrite(self, found: dict[str, tuple[str, float | None]]) -> None:
        """The file again with only its live keys (caller holds the exclusive lock). Every
        mark this process made is in the file before ``set`` returns, so the file is the
        whole truth: memory adds nothing."""
        now = self._clock()
        live = [_line(k, v, e) for k, (v, e) in found.items() if e is None or e > now]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(live)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _compact(self) -> dict[str, tuple[str, float | None]]:
        """Read the file and rewrite it with its live keys (in a worker thread); returns
        what it read, for the loop to merge."""
        with self._io, self._locked(fcntl.LOCK_EX):
            found = self._read()
            self._rewrite(found)
        return found

    async def set(self, key: str, value: str, ttl_s: int | None = None) -> None:
        if any(c in key or c in value for c in "\t\n"):
            raise ValueError(f"journal keys and values hold no tabs or newlines: {key!r}")
        await super().set(key, value, ttl_s)
        if self._set_meanwhile is not None:
            self._set_meanwhile.add(key)
        await asyncio.to_thread(self._write, _line(key, value, self._data[key][1]).encode())
        self._appended += 1
        if self._set_meanwhile is None and self._appended > max(
            COMPACT_FLOOR, 4 * len(self._data)
        ):
            self._set_meanwhile = set()
            try:
                found = await asyncio.to_thread(self._compact)
                self._merge(found, skip=self._set_meanwhile)
                self._appended = 0
            finally:
                self._set_meanwhile = None

    def _write(self, line: bytes) -> None:
        """One write to the end of the file, in the kernel before this returns (a shared lock:
        no rewrite drops it), then fsync'd when asked."""
        with self._io:
            if self._fd < 0:
                raise RuntimeError(f"the posted-parts journal {self.path} is closed")
            with self._locked(fcntl.LOCK_SH):
                os.write(self._fd, line)
            if self._fsync:
                os.fsync(self._fd)

    async def close(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        """Close the file once: a second close would close whatever file of this process
        got the descriptor's number since (another thread's, mid-open)."""
        with self._io:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _line(key: str, value: str, expires: float | None) -> str:
    return f"{key}\t{value}\t{'' if expires is None else repr(expires)}\n"


def open_posted_journal(data_dir: Path, platform: str) -> MemoryState:
    """The journal for ``platform`` under ``data_dir``; a plain ``MemoryState`` (with a
    warning) when the folder cannot be written."""
    path = posted_journal_path(data_dir, platform)
    try:
        return JournalState(path)
    except OSError as exc:
        log.warning("cannot keep the posted-parts journal at %s (%s): keeping it in memory; "
                    "a photo may be posted twice if the bot and Redis fail together", path, exc)
        return MemoryState()
