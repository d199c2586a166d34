"""Chat texts about credits (moved out of storage/ledger.py): durations and balances."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bots.common import texts
from storage.ledger import Balance, PackCredits


def test_until_formats_durations() -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    assert texts.until(base + timedelta(hours=5, minutes=12), base) == "5 h 12 min"
    assert texts.until(base + timedelta(hours=2), base) == "2 h"
    assert texts.until(base + timedelta(seconds=30), base) == "1 min"
    assert texts.until(base + timedelta(minutes=59, seconds=1), base) == "1 h"


def test_describe_balance_names_the_reset_and_the_packs() -> None:
    evening = datetime(2026, 3, 2, 18, 48, tzinfo=UTC)
    reset = datetime(2026, 3, 3, tzinfo=UTC)
    daily_only = Balance(daily_left=2, daily_allowance=10, packs=[], total=2, next_reset=reset)
    assert texts.describe_balance(daily_only, evening) == "2 left today (resets in 5 h 12 min)"
    packs = [PackCredits(amount=3, expires_at=None), PackCredits(amount=1, expires_at=reset)]
    both = daily_only.model_copy(update={"packs": packs, "total": 6})
    assert texts.describe_balance(both, evening) == (
        "2 left today (resets in 5 h 12 min) and 4 in packs"
    )
    assert texts.describe_balance(both, evening) in texts.welcome("Ada", both, evening, "")
