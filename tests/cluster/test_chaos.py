"""The reliability campaign in short (bench/chaos.py runs it for half an hour): two minutes of
jobs through the Telegram bot, two dispatcher processes and a three-node Ray cluster while 22
seeded faults, two of each kind, hit them (worker and node loss, dispatcher and bot SIGKILL,
Redis restarted with and without AOF and frozen, PostgreSQL crashed, poison jobs, a 429 storm,
payment updates duplicated and out of order on Telegram and Discord). Every accepted job must
end once, charged or refunded once, delivered once, every charge credit once and its refund
take back what is left, with nothing stuck in Redis and the ledger balanced."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import ray

from bench.chaos import Config, campaign
from bench.chaos_faults import KINDS
from tests.conftest import service_missing

log = logging.getLogger(__name__)

SEED = 11


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_two_minutes_of_faults_under_load_break_no_promise(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        service_missing("redis-server")
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")):
        service_missing("PostgreSQL server binaries (pg_ctl)")
    if ray.is_initialized():  # another module's Ray: this test runs a cluster of its own
        ray.shutdown()
    cfg = Config(seconds=120, faults=2 * len(KINDS), seed=SEED, rate=1.0, drain_s=150)
    report = await campaign(cfg, tmp_path / "chaos")
    log.info("\n%s", report.table())
    assert report.faults == dict.fromkeys(KINDS, 2), report.table()
    assert report.outcomes.get("succeeded", 0) >= 50, report.table()
    assert report.violations == [], report.table()
