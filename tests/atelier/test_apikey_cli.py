"""`atelier apikey create | list | revoke` against a migrated SQLite store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from atelier.cli import app
from storage import apikeys
from storage.db import make_engine
from storage.models import ApiKey

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATELIER_DATABASE_URL", f"sqlite:///{tmp_path / 'a.db'}")
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    return tmp_path


def test_create_list_revoke(env: Path) -> None:
    made = runner.invoke(app, ["apikey", "create", "telegram:123", "--name", "tavern"])
    assert made.exit_code == 0, made.output
    key = re.search(r"atk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", made.output)
    assert key is not None, made.output
    prefix = key.group(0)[:12]
    engine = make_engine(f"sqlite:///{env / 'a.db'}")
    try:
        with Session(engine) as s:
            row = s.exec(select(ApiKey)).one()
            assert row.key_hash == apikeys.hash_key(key.group(0)) and row.name == "tavern"
            assert apikeys.verify_api_key(session=s, key=key.group(0)).platform == "telegram"
    finally:
        engine.dispose()

    listed = runner.invoke(app, ["apikey", "list", "telegram:123"], terminal_width=200)
    assert listed.exit_code == 0 and prefix in listed.output and "tavern" in listed.output
    assert key.group(0) not in listed.output

    revoked = runner.invoke(app, ["apikey", "revoke", prefix])
    assert revoked.exit_code == 0 and f"revoked {prefix} (telegram:123)" in revoked.output
    missing = runner.invoke(app, ["apikey", "revoke", "atk_00000000"])
    assert missing.exit_code != 0 and "no API key atk_00000000" in missing.output
    assert runner.invoke(app, ["apikey", "create", "nocolon"]).exit_code == 2
