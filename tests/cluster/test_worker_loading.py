"""A worker on a real local Ray keeps answering ``info()`` while it downloads a model (a load
slower than its dispatcher's info timeout never gets it marked dead), and a download the hub
refuses ends the batch as a failure no retry mends (model_unavailable)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from cluster.contract import BatchItem, WorkerFailed, init_local_ray, run_batch
from cluster.placement import WorkerPool
from core.request import GenerationRequest
from core.settings import WorkerConfig
from engine.actor import spawn_worker
from engine.devices import DeviceProfile
from testing.hub import FakeHub

INFO_TIMEOUT_S = 2.0
HUB_DELAY_S = 7.0  # each answer about the repo: the load takes longer than the info timeout

GHOST = """
[models.ghost]
repo = "nobody/ghost"
family = "sd15"
min_vram_gb = 0
default_width = 64
default_height = 64
max_width = 64
max_height = 64
default_steps = 2
max_steps = 4
scheduler = "Euler"
guidance = 7.0
"""


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    init_local_ray(num_cpus=1, resources={"device:cpu": 1},
                   object_store_memory=100 * 1024 * 1024)
    yield
    ray.shutdown()


async def test_a_worker_answers_info_while_a_slow_download_runs(
    local_ray: None, tmp_path: Path, cpu_profile: DeviceProfile
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(GHOST)
    config = WorkerConfig(data_dir=tmp_path, models_file=models)
    with FakeHub(delay_s=HUB_DELAY_S) as hub:
        # The worker's process as on a box online: no HF_HUB_OFFLINE, the hub at HF_ENDPOINT.
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url,
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        handle = spawn_worker(settings=config, device_class="cpu", profile=cpu_profile,
                              runtime_env={"env_vars": env})
        pool = await WorkerPool.from_handles([handle], info_timeout_s=INFO_TIMEOUT_S)
        (slot,) = pool.slots
        assert slot.info.loadable_models is not None and "ghost" in slot.info.loadable_models
        request = GenerationRequest(prompt="a fox", model="ghost", width=64, height=64,
                                    steps=2, guidance=7.0, scheduler="Euler", seed=1)
        began = time.monotonic()
        batch = asyncio.create_task(
            run_batch(handle, [BatchItem("j1", request)], timeout_s=120, lease_s=None)
        )
        refreshes = 0
        while not batch.done():
            await pool.refresh()
            refreshes += 1
            assert slot.alive, f"marked dead while loading: {slot.lost_reason}"
            await asyncio.sleep(0.5)
        with pytest.raises(WorkerFailed) as failed:
            await batch
        took = time.monotonic() - began
    # The load did wait on the hub for longer than the info timeout, and info() answered.
    assert took > HUB_DELAY_S > INFO_TIMEOUT_S and refreshes >= 3, (took, refreshes)
    assert any("/nobody/ghost/" in r for r in hub.requests), hub.requests
    assert failed.value.error_code == "model_unavailable", failed.value.message
    assert "the Hugging Face hub has no such repo" in failed.value.message
    ray.kill(handle)
