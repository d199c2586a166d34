"""`atelier account set-tier` and `atelier credits purchases` on a temp SQLite store."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from atelier.cli import app
from core.settings import load_settings
from storage import accounts, purchases
from storage.db import make_engine, session_factory, transaction

runner = CliRunner()


def test_set_tier_and_list_purchases(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    missing = runner.invoke(app, ["account", "set-tier", "telegram:7", "pro"])
    assert missing.exit_code == 1 and "no account for telegram:7" in missing.output
    assert runner.invoke(app, ["credits", "grant", "telegram:7", "1"]).exit_code == 0
    bad = runner.invoke(app, ["account", "set-tier", "telegram:7", "gold"])
    assert bad.exit_code == 1 and "unknown tier 'gold'" in bad.output
    ok = runner.invoke(app, ["account", "set-tier", "telegram:7", "pro"])
    assert ok.exit_code == 0 and "now on tier pro" in ok.output, ok.output

    settings = load_settings(data_dir=env, _env_file=None)
    engine = make_engine(settings.db_url)
    now = datetime.now(UTC)
    with transaction(session_factory(engine)) as s:
        acc = accounts.find_account(session=s, platform="telegram", platform_user_id="7")
        purchases.record_pack(
            session=s, account_id=acc.id, platform="telegram", platform_user_id="7",
            charge_id="stars-1", product="small", credits=100,
            expires_at=now + timedelta(days=90), now=now,
        )
    with transaction(session_factory(engine)) as s:
        purchases.refund(session=s, key="telegram:stars-1", now=now)
    engine.dispose()
    listed = runner.invoke(app, ["credits", "purchases", "telegram:7"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert "1 purchase(s)" in listed.output and "tier pro" in listed.output
    assert "telegram:stars-1" in listed.output and "refunded" in listed.output


def test_block_show_and_unblock(env: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    missing = runner.invoke(app, ["account", "block", "telegram:8", "--reason", "spam"])
    assert missing.exit_code == 1 and "no account for telegram:8" in missing.output
    assert runner.invoke(app, ["credits", "grant", "telegram:8", "1"]).exit_code == 0
    no_reason = runner.invoke(app, ["account", "block", "telegram:8", "--reason", "  "])
    assert no_reason.exit_code == 1 and "reason must be 1 to 300" in no_reason.output
    shown = runner.invoke(app, ["account", "show", "telegram:8"], terminal_width=200)
    assert shown.exit_code == 0 and "blocked" in shown.output and "no" in shown.output
    ok = runner.invoke(app, ["account", "block", "telegram:8", "--reason", "chargeback fraud"])
    assert ok.exit_code == 0 and "is blocked: chargeback fraud" in ok.output, ok.output
    shown = runner.invoke(app, ["account", "show", "telegram:8"], terminal_width=200)
    assert "since" in shown.output and "chargeback fraud" in shown.output, shown.output

    settings = load_settings(data_dir=env, _env_file=None)
    engine = make_engine(settings.db_url)
    with transaction(session_factory(engine)) as s:
        acc = accounts.find_account(session=s, platform="telegram", platform_user_id="8")
    engine.dispose()
    assert acc.blocked and acc.blocked_reason == "chargeback fraud"
    lifted = runner.invoke(app, ["account", "unblock", "telegram:8"])
    assert lifted.exit_code == 0 and "is no longer blocked" in lifted.output
    again = runner.invoke(app, ["account", "unblock", "telegram:8"])
    assert again.exit_code == 0 and "was not blocked" in again.output
