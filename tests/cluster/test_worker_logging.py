"""A worker actor's logging: the dispatcher's format and level travel in its WorkerConfig
(the actor's process reads no ATELIER_* variables), and an internal error's traceback travels
back in the error event, so it reaches the dispatcher's log even when the worker's pod is gone."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.contract import BatchItem, init_local_ray, run_batch
from core.logs import JobFilter, JsonFormatter, job_context
from core.request import GenerationRequest
from core.settings import load_settings
from engine.actor import _final_event, spawn_worker
from engine.devices import DeviceProfile
from tests.cluster.conftest import TinyModels


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


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    init_local_ray(num_cpus=1, resources={"device:cpu": 1},
                   object_store_memory=200 * 1024 * 1024)
    yield
    ray.shutdown()


def _actor_lines(marker: str) -> list[dict[str, object]]:
    """The JSON lines containing ``marker`` in this Ray's worker logs (what a pod keeps)."""
    node = ray._private.worker._global_node  # type: ignore[attr-defined]
    lines = []
    for path in Path(node.get_logs_dir_path()).glob("worker-*"):
        for line in path.read_text(errors="replace").splitlines():
            if marker in line and line.startswith("{"):
                lines.append(json.loads(line))
    return lines


@pytest.mark.timeout(240)
async def test_a_worker_actor_logs_json_lines_with_its_jobs(
    local_ray: None, tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    settings = tiny_models.settings.model_copy(update={"log_format": "json"})
    handle = spawn_worker(settings=settings.worker_config(), device_class="cpu",
                          profile=cpu_profile, name="test-json-logs", timeout_s=120)
    try:
        request = GenerationRequest(prompt="a fox", model="tiny", width=64, height=64,
                                    steps=2, seed=1)
        await run_batch(handle, [BatchItem("job-json-1", request)], timeout_s=120)
        deadline = time.monotonic() + 30  # Ray flushes the worker's stderr to its file
        while not (lines := _actor_lines("loading model")) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
    finally:
        ray.kill(handle)
    assert lines, "no JSON line about loading the model in the worker's log"
    assert lines[0]["job_id"] == "job-json-1" and lines[0]["level"] == "INFO"
