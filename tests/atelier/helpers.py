"""Helpers shared by the tests that run the real `atelier` CLI in a subprocess."""

from __future__ import annotations

import select
import subprocess
import time

import pytest


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if needle in line:
                return seen
        elif proc.poll() is not None:
            break
    pytest.fail(f"`atelier up` never printed {needle!r} in {timeout}s; output:\n{''.join(seen)}")
