"""Cluster fixtures: tiny random-weight models built once per session, offline, with a registry
that points at them (the packaged "tiny" and "tiny-xl" entries), CPU device profiles, and a fresh
migrated store per test (SQLite, or PostgreSQL when parametrized)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from cluster.registry import ModelRegistry
from core.settings import Settings, load_settings
from engine.devices import DeviceInfo, DeviceProfile, choose_profile
from engine.tiny import make_tiny_models
from storage.db import make_engine, upgrade
from tests.cluster.helpers import PG_ADMIN_URL
from tests.conftest import forbid_in_fast_tier, service_missing

# Registry names of the tiny models, by family.
TINY_NAMES = {"sd15": "tiny", "sdxl": "tiny-xl"}


@dataclass(frozen=True)
class TinyModels:
    """Where the tiny models live and a registry that knows them as "tiny" / "tiny-xl"."""

    data_dir: Path
    settings: Settings
    registry: ModelRegistry
    sd15: Path
    sdxl: Path

    def path(self, family: str) -> Path:
        return self.sd15 if family == "sd15" else self.sdxl

    def name(self, family: str) -> str:
        return TINY_NAMES[family]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    data_dir = tmp_path_factory.mktemp("atelier-tiny")
    paths = make_tiny_models(data_dir / "models", seed=0)
    settings = load_settings(data_dir=data_dir, _env_file=None)
    return TinyModels(
        data_dir=data_dir,
        settings=settings,
        registry=ModelRegistry.load(settings),
        sd15=paths["sd15"],
        sdxl=paths["sdxl"],
    )


def _cpu_info(*, bf16: bool = False, cores: int = 2) -> DeviceInfo:
    """A described CPU (tests decide profiles without depending on this machine's CPU)."""
    flags = ("avx2", "avx512f", "avx512_bf16") if bf16 else ("avx2",)
    return DeviceInfo(
        kind="cpu",
        name="Test CPU",
        total_memory=16 * 2**30,
        bf16=bf16,
        cpu_bf16=bf16,
        cpu_flags=flags,
        cores=cores,
        logical_cpus=cores,
    )


@pytest.fixture(scope="session")
def cpu_profile() -> DeviceProfile:
    """fp32 on CPU: the tiny models' own dtype, so runs are exact and repeatable."""
    return choose_profile(_cpu_info(bf16=False), "sd15")


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """apply_profile sets torch's thread count process-wide; keep tests independent of it.

    torch is only looked at, never imported here: tests without models stay light.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if torch is not None and before is not None:
        torch.set_num_threads(before)


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh migrated database: a SQLite file, or (parametrized) a PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'atelier.db'}"
        upgrade(url)
        yield url
        return
    forbid_in_fast_tier("PostgreSQL")
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL} ({exc})")
    name = f"atelier_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()
