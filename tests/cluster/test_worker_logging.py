"""A worker actor's logging: the dispatcher's format and level travel in its WorkerConfig
(the actor's process reads no ATELIER_* variables), and an internal error's traceback travels
back in the error event, so it reaches the dispatcher's log even when the worker's pod is gone."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from cluster.worker import _final_event
from core.logs import JobFilter, JsonFormatter, job_context
from core.settings import load_settings


def test_the_worker_config_carries_the_log_format(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, _env_file=None, log_format="json",
                             log_level="DEBUG")
    config = settings.worker_config()
    assert (config.log_format, config.log_level) == ("json", "DEBUG")


async def test_an_internal_error_carries_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    work: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    except RuntimeError as exc:
        work.set_exception(exc)
    with job_context(["job-1", "job-2"]), caplog.at_level(logging.ERROR):
        event = _final_event(work)  # type: ignore[arg-type]
    assert event["code"] == "internal" and "illegal memory access" not in event["message"]
    assert "RuntimeError: CUDA error: an illegal memory access" in event["detail"]
    assert "Traceback" in event["detail"]
    # The worker's own line, as JSON, names the jobs.
    (record,) = [r for r in caplog.records if r.getMessage() == "generation failed on worker"]
    with job_context(["job-1", "job-2"]):
        JobFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["job_id"] == "job-1,job-2" and "RuntimeError" in line["exc"]
