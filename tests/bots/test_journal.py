"""The posted-parts journal (``bots.common.journal``): marks outlive the process that wrote
them, expire, and survive the file being rewritten or cut short by a crash."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from bots.common.journal import COMPACT_FLOOR, JournalState, posted_journal_path


async def test_marks_are_read_back_by_the_next_process(tmp_path: Path) -> None:
    path = posted_journal_path(tmp_path, "telegram")
    first = JournalState(path)
    await first.set("atelier:bot:telegram:posted:j1:1", "1", 3600)
    await first.set("atelier:bot:telegram:posted:j2:1", "1", 3600)
    # No close: the next process finds what a killed one wrote.
    again = JournalState(path)
    assert await again.get("atelier:bot:telegram:posted:j1:1") == "1"
    assert await again.get("atelier:bot:telegram:posted:j2:1") == "1"
    assert await again.get("atelier:bot:telegram:posted:j3:1") is None


async def test_a_sigkilled_writer_loses_no_mark(tmp_path: Path) -> None:
    path = posted_journal_path(tmp_path, "telegram")
    code = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from bots.common.journal import JournalState
        async def main():
            j = JournalState(Path({str(path)!r}), fsync=False)
            for i in range(200):
                await j.set(f"posted:job{{i}}:1", "1", 3600)
            print("written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "written" in done.stdout
    reread = JournalState(path)
    assert all([await reread.get(f"posted:job{i}:1") == "1" for i in range(200)])


async def test_expired_marks_are_dropped_and_the_file_rewritten(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "j.journal"
    journal = JournalState(path, fsync=False, clock=lambda: now[0])
    await journal.set("short", "1", 10)
    await journal.set("long", "1", 1000)
    now[0] += 60
    assert await journal.get("short") is None
    reopened = JournalState(path, fsync=False, clock=lambda: now[0])
    assert await reopened.get("short") is None
    assert await reopened.get("long") == "1"
    assert "short" not in path.read_text()  # rewritten at start with the live keys only


async def test_the_file_is_compacted_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = JournalState(path, fsync=False)
    for i in range(COMPACT_FLOOR + 10):
        await journal.set("same-key", str(i), 3600)
    assert len(path.read_text().splitlines()) < 100
    assert await JournalState(path).get("same-key") == str(COMPACT_FLOOR + 9)


async def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "j.journal"
    journal = JournalState(path, fsync=False)
    await journal.set("whole", "1", 3600)
    with open(path, "a") as f:
        f.write("cut-off\t1")  # no expiry field, no newline
    reopened = JournalState(path)
    assert await reopened.get("whole") == "1"
    assert await reopened.get("cut-off") is None
    await reopened.set("after", "1", 3600)
    assert await JournalState(path).get("after") == "1"


async def test_a_data_folder_that_cannot_be_written_falls_back_to_memory(
    tmp_path: Path,
) -> None:
    from bots.common.journal import open_posted_journal

    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where the data folder should be")
    state = open_posted_journal(not_a_folder, "telegram")
    assert not isinstance(state, JournalState)
    await state.set("k", "1", 60)
    assert await state.get("k") == "1"


async def test_two_processes_on_one_file_lose_no_mark_when_one_rewrites_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.journal"
    first, second = JournalState(path, fsync=False), JournalState(path, fsync=False)
    await second.set("before", "1", 3600)
    for i in range(COMPACT_FLOOR + 10):  # the first rewrites the file (a new one) meanwhile
        await first.set("busy", str(i), 3600)
    await second.set("after", "1", 3600)  # to the new file, not the one it opened
    reread = JournalState(path)
    assert await reread.get("before") == "1"
    assert await reread.get("after") == "1"


async def test_a_mark_waits_for_the_file_lock_off_the_event_loop(tmp_path: Path) -> None:
    # Another process rewriting the file holds its lock; a mark waits for it in a worker
    # thread, so the loop (shared with every bot and the web app) keeps serving meanwhile.
    path = tmp_path / "j.journal"
    journal = JournalState(path, fsync=False)
    with open(path, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        # Released in any case, so a loop that blocks on the lock ends the test, failing it.
        release = threading.Timer(2.0, fcntl.flock, (other, fcntl.LOCK_UN))
        release.start()
        try:
            marking = asyncio.create_task(journal.set("k", "1", 3600))
            await asyncio.sleep(0.3)
            assert not marking.done()  # waiting in its thread while this loop went on
            fcntl.flock(other, fcntl.LOCK_UN)
            await asyncio.wait_for(marking, 10)
        finally:
            release.cancel()
    assert await JournalState(path).get("k") == "1"


async def test_closing_twice_leaves_a_reused_descriptor_alone(tmp_path: Path) -> None:
    """The second close must not close the file that got the descriptor's number since (in
    CI a bot's second close shut the shop file another bot was opening)."""
    for _ in range(20):  # another thread of this process may take the number first
        journal = JournalState(posted_journal_path(tmp_path, "discord"))
        number = journal._fd
        await journal.close()
        # The kernel hands out the lowest free number: the one just closed.
        other = os.open(tmp_path / "shop.toml", os.O_RDWR | os.O_CREAT, 0o600)
        if other == number:
            break
        os.close(other)
    else:
        raise AssertionError("no file ever got the closed journal's descriptor number")
    try:
        await journal.close()
        os.fstat(other)  # still open
        try:
            await journal.set("posted:j1:1", "1", 60)
        except RuntimeError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("a mark after close must not be written anywhere")
        assert os.read(other, 100) == b"", "nothing went into the file that took the number"
    finally:
        os.close(other)
