"""``atelier db prune`` on a temp SQLite store: old settled rows go, balances stay."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atelier.cli import app
from storage import accounts, ledger
from storage.db import make_engine, session_factory, transaction
from storage.models import CreditLedger

runner = CliRunner()


def test_prune_removes_old_rows_and_keeps_the_balance(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    engine = make_engine(f"sqlite:///{env / 'atelier.db'}")
    sessions = session_factory(engine)
    long_ago = datetime.now(UTC) - timedelta(days=200)
    with transaction(sessions) as s:
        acct = accounts.resolve_account(session=s, platform="telegram", platform_user_id="7",
                                        default_tier="free", now=long_ago)
        for n in range(5):
            ledger.grant(session=s, account_id=acct.id, amount=3, key=f"old-{n}", now=long_ago)
    with transaction(sessions) as s:
        before = ledger.audit(session=s, account_id=acct.id)
        rows_before = len(s.query(CreditLedger).all())

    res = runner.invoke(app, ["db", "prune"])

    assert res.exit_code == 0, res.output
    assert "pruned 5 rows" in res.output and "ledger 5" in res.output
    with transaction(sessions) as s:
        assert ledger.audit(session=s, account_id=acct.id) == before
        assert len(s.query(CreditLedger).all()) == rows_before - 5 + 1  # one carried row
    engine.dispose()


def test_prune_refuses_a_too_short_retention(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_RETENTION__DAYS", "1")
    res = runner.invoke(app, ["db", "prune"])
    assert res.exit_code != 0
    assert "RETENTION__DAYS" in res.output or "retention" in res.output.lower()


def test_prune_says_how_many_control_previews_went(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    res = runner.invoke(app, ["db", "prune"])
    assert res.exit_code == 0, res.output
    assert "pruned 0 control-map previews" in res.output
