"""`atelier gallery link IDENTITY`: a signed gallery link for someone without a chat bot,
valid for ATELIER_GALLERY_LINK_TTL_S."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atelier.cli import app
from core.errors import Forbidden
from core.settings import load_settings
from core.signing import GALLERY_PURPOSE, expires_at, verify

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ATELIER_DATABASE_URL", f"sqlite:///{tmp_path / 'a.db'}")
    monkeypatch.setenv("ATELIER_PUBLIC_BASE_URL", "https://art.example.org/")
    monkeypatch.setenv("ATELIER_GALLERY_LINK_TTL_S", "7200")
    monkeypatch.chdir(tmp_path)  # no stray .env
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    return tmp_path


def test_prints_a_link_that_opens_the_identity_s_gallery(env: Path) -> None:
    made = runner.invoke(app, ["apikey", "create", "telegram:123"])
    assert made.exit_code == 0, made.output
    account = re.search(r"\(account (\d+)\)", made.output)
    assert account is not None, made.output
    reply = runner.invoke(app, ["gallery", "link", "telegram:123"], terminal_width=400)
    assert reply.exit_code == 0, reply.output
    assert "valid 2 hours" in reply.output
    found = re.search(r"https://art\.example\.org/g/(\S+)", reply.output)
    assert found is not None, reply.output
    token, now = found.group(1), datetime.now(UTC)
    key = load_settings().resolved_signing_key
    assert verify(key, token, purpose=GALLERY_PURPOSE, now=now) == account.group(1)
    assert abs(expires_at(token) - (now + timedelta(hours=2))) < timedelta(minutes=1)
    with pytest.raises(Forbidden, match="expired"):
        verify(key, token, purpose=GALLERY_PURPOSE, now=now + timedelta(hours=2, minutes=1))


def test_an_unknown_identity_is_refused_naming_it(env: Path) -> None:
    reply = runner.invoke(app, ["gallery", "link", "discord:999"])
    assert reply.exit_code == 1 and "discord:999" in reply.output
    assert "atelier apikey create" in reply.output
    assert runner.invoke(app, ["gallery", "link", "nocolon"]).exit_code == 2
