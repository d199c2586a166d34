"""A job through the local stack (the single-box assembly: Redis, SQLite, local Ray, a CPU
worker, the tiny model) moves the right counters and histograms, read over HTTP from the
stack's own /metrics; /healthz and /readyz answer with the store, broker and Ray reachable."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from atelier.app import local_stack
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from core.settings import load_settings
from storage.db import upgrade
from tests.cluster.conftest import TinyModels
from tests.cluster.scrape import get, scrape, value


async def test_a_job_moves_counters_and_histograms(
    tiny_models: TinyModels, redis_url: str, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(db_url)
    settings = load_settings(
        data_dir=tiny_models.data_dir, database_url=db_url, redis_url=redis_url,
        metrics={"port": 0}, _env_file=None,
    )
    async with local_stack(settings) as stack:
        assert stack.metrics is not None
        base = f"http://127.0.0.1:{stack.metrics.port}"
        cls = stack.device_classes[0]
        before = await scrape(base)
        request = GenerationRequest(prompt="a fox", model="tiny", width=64, height=64, steps=2,
                                    scheduler="Euler", count=2)
        job = await stack.client.submit(
            request, Requester(platform="web", platform_user_id="m"),
            DeliveryTarget(frontend="web"), uuid.uuid4().hex,
        )
        event = await asyncio.wait_for(stack.client.wait(job.job_id), 180)
        assert event.kind == "done", event
        await asyncio.sleep(1.5)  # the gauges refresh every second
        after = await scrape(base)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("atelier_jobs_succeeded_total", device_class=cls) == 1
        assert moved("atelier_batch_size_count", device_class=cls) == 1
        assert moved("atelier_batch_size_sum", device_class=cls) == 1  # one job, two images
        for stage in ("wait", "run", "latency"):
            assert moved(f"atelier_job_{stage}_seconds_count", device_class=cls) == 1, stage
        assert moved("atelier_job_latency_seconds_sum", device_class=cls) >= moved(
            "atelier_job_run_seconds_sum", device_class=cls
        ) > 0
        assert moved("atelier_credits_charged_total") == job.cost > 0
        assert moved("atelier_credits_refunded_total") == 0
        # A fresh worker loaded the model for this job, and said how long it took.
        assert moved("atelier_model_loads_total", model="tiny", device_class=cls) == 1
        assert moved("atelier_model_load_seconds_count", model="tiny") == 1
        assert moved("atelier_model_load_seconds_sum", model="tiny") > 0
        worker = stack.dispatcher.batches[-1].worker_id if stack.dispatcher else ""
        assert moved("atelier_worker_busy_seconds_total", worker=worker, device_class=cls) > 0
        assert value(after, "atelier_queue_depth", device_class=cls) == 0
        assert value(after, "atelier_workers", device_class=cls, state="idle") == 1
        assert value(after, "atelier_deliveries_pending") == 1  # nobody marked it delivered

        assert await get(base + "/healthz") == (200, "ok\n")
        status, body = await get(base + "/readyz")
        assert status == 200 and body == "store: ok\nbroker: ok\nray: ok\ndispatcher: ok\n", body
