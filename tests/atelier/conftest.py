"""Fixtures shared by the CLI tests: a temp data dir as the whole environment."""

from pathlib import Path

import pytest


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp SQLite store under ATELIER_DATA_DIR, no database URL, and no stray .env."""
    monkeypatch.setenv("ATELIER_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("ATELIER_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return tmp_path
