"""Supervised parts: an unexpected end is logged with its traceback and the part started again,
with growing waits while it keeps failing; /readyz names a part that is down."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from cluster.health import Probe, with_probe
from cluster.supervise import Backoff, Parts, supervise


async def _until(predicate: object, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.01)


async def test_a_part_that_raises_is_logged_with_its_traceback_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    runs: list[int] = []

    async def part() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("the store went away")
        await stop.wait()

    parts = Parts()
    caplog.set_level(logging.INFO, logger="cluster.supervise")
    task = asyncio.create_task(
        supervise("dispatcher", part, stop, parts=parts, backoff=Backoff(initial_s=0.05))
    )
    await _until(lambda: len(runs) == 2)
    await _until(lambda: parts.states() == {"dispatcher": "ok"})
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "dispatcher stopped unexpectedly (RuntimeError: the store went away)" in (
        record.getMessage()), record.getMessage()
    assert record.exc_info is not None and "the store went away" in caplog.text
    assert "Traceback" in caplog.text and "in part" in caplog.text  # the part's own frame
    stop.set()
    await asyncio.wait_for(task, 5)
    assert parts.states() == {}  # a part that stopped as asked leaves the registry
    assert len(runs) == 2


async def test_a_part_that_keeps_failing_backs_off_and_is_reported_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    calls: list[float] = []

    async def part() -> None:
        calls.append(asyncio.get_running_loop().time())
        raise ConnectionError("refused")

    parts = Parts()
    probe = Probe({}, parts=parts)
    task = asyncio.create_task(
        supervise("bot deliveries", part, stop, parts=parts,
                  backoff=Backoff(initial_s=0.1, cap_s=0.4))
    )
    await _until(lambda: len(calls) >= 5)
    status, _, body = await probe.respond("/readyz")
    assert status == 503
    assert re.fullmatch(
        r"bot deliveries: down \(ConnectionError: refused\); restart \d+ in 0\.\d s\n",
        body.decode(),
    ), body
    stop.set()
    await asyncio.wait_for(task, 5)
    waits = [float(m) for m in re.findall(r"restarting in ([\d.]+) s", caplog.text)]
    assert waits[:5] == [0.1, 0.2, 0.4, 0.4, 0.4], waits  # doubling, capped
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=False)), (gaps, waits)


async def test_a_part_that_returns_unasked_counts_as_an_unexpected_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    runs: list[int] = []

    async def part() -> None:
        runs.append(1)

    parts = Parts()
    task = asyncio.create_task(
        supervise("web server", part, stop, parts=parts, backoff=Backoff(initial_s=0.05))
    )
    await _until(lambda: len(runs) >= 2)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert "web server ended though not asked to stop" in caplog.text


async def test_readyz_of_a_web_app_names_a_troubled_part() -> None:
    stop = asyncio.Event()
    trouble: list[str] = ["store unavailable (OperationalError: connection refused)"]
    parts = Parts()

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the probe answers /readyz")

    probe = Probe({}, parts=parts)
    task = asyncio.create_task(
        supervise("dispatcher", stop.wait, stop, parts=parts,
                  trouble=lambda: trouble[0] if trouble else None)
    )
    await _until(lambda: "dispatcher" in parts.parts)
    wrapped = with_probe(app, probe)
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await wrapped({"type": "http", "path": "/readyz"}, None, send)
    assert sent[0]["status"] == 503
    assert sent[1]["body"] == (
        b"dispatcher: store unavailable (OperationalError: connection refused)\n")
    trouble.clear()
    sent.clear()
    await wrapped({"type": "http", "path": "/readyz"}, None, send)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"dispatcher: ok\n"
    stop.set()
    await asyncio.wait_for(task, 5)


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial_s <= cap_s, got 5 and 1"):
        Backoff(initial_s=5, cap_s=1)

