"""One event loop serves the web app, both APIs and the bots (`atelier up`): hostile requests
in flight (30 MB bodies, 10 MB and 5 MB images, 1 MB prompts to the REST and A1111 APIs and
to the Telegram bot) leave /healthz and a chat command's first reply fast. The harness is
``bench.hostile``: the app served by uvicorn in this loop with the bot beside it, and the
outside world (the fake Bot API, attackers, probes) in a process of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.hostile import Figures, measure

# The whole single-box stack (it imports Ray, though it starts no worker): not the fast tier.
pytestmark = [pytest.mark.services, pytest.mark.slow]
GOAL_MS = 100.0
ROUNDS = 3


def _attacked(figures: Figures) -> None:
    """The round really was hostile: every attack was sent and refused as it should be."""
    web = figures.web
    for name in ("body-declared", "body-streamed", "image-10mb-sdapi"):
        # 413, or the connection closed after it while the client was still sending.
        assert set(web[name]) <= {"413", "RemoteProtocolError", "WriteError"}, web
        assert sum(web[name].values()), web
    for name in ("image-5mb-v1", "image-5mb-sdapi", "prompt-1mb-v1", "prompt-1mb-sdapi"):
        assert web[name].get("422"), web
    assert figures.chat["1 MB prompt"] and figures.chat["10 MB photo"], figures.chat
    assert len(figures.chat_ms) >= 10 and len(figures.healthz_ms) >= 100, figures.lines()
    assert all(text.startswith("⏳ a lighthouse at dusk") for text in figures.replies)


@pytest.mark.timeout(600)
async def test_hostile_requests_leave_healthz_and_the_chat_fast(tmp_path: Path) -> None:
    quiet, *rounds = await measure(tmp_path / "data", seconds=6, rounds=ROUNDS, baseline=True)
    report = "\n".join(
        f"round {n}: {line}" for n, f in enumerate([quiet, *rounds]) for line in f.lines()
    )
    for figures in rounds:
        _attacked(figures)
    # What the attack adds, best of the rounds: this box's other tenants (2 cores shared by
    # several test runs) add pauses of their own to any one round, and to the quiet one
    # measured first; a loop that did the attackers' work itself stalls for seconds in
    # every round.
    assert min(f.healthz_p99 for f in rounds) - quiet.healthz_p99 < GOAL_MS, report
    assert min(f.chat_median for f in rounds) - quiet.chat_median < GOAL_MS, report
