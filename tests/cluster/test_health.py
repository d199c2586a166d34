"""/readyz follows the broker: unready while Redis is down, ready again once it is back (the
shared-process assembly a bot uses, over a Redis of the test's own); the ASGI app answers as
the standalone server does; JSON log lines carry the job id."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from atelier.app import serve_metrics, shared_stack
from cluster.health import Probe, asgi_app, with_probe
from core import metrics
from core.logs import JobFilter, JsonFormatter, job_context
from core.settings import load_settings
from storage.db import upgrade
from tests.cluster.scrape import get
from tests.conftest import RedisServer


async def _until(base: str, status: int, timeout: float = 20) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got, body = await get(base + "/readyz")
        if got == status:
            return body
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"/readyz stayed {got} ({body!r}), wanted {status}")
        await asyncio.sleep(0.2)


async def test_readyz_turns_unready_when_redis_stops_and_ready_when_it_is_back(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'atelier.db'}"
    upgrade(db_url)
    settings = load_settings(
        data_dir=tmp_path, database_url=db_url, redis_url=private_redis.url,
        metrics={"port": 0, "check_timeout_s": 1.0}, _env_file=None,
    )
    async with shared_stack(settings) as stack, serve_metrics(
        settings, stack, with_ray=False
    ) as server:
        assert server is not None
        base = f"http://127.0.0.1:{server.port}"
        assert await _until(base, 200) == "store: ok\nbroker: ok\n"
        private_redis.stop()
        body = await _until(base, 503)
        assert "store: ok" in body and "broker: ConnectionError" in body, body
        assert await get(base + "/healthz") == (200, "ok\n")  # alive, just not ready
        private_redis.start()
        assert await _until(base, 200) == "store: ok\nbroker: ok\n"


async def test_the_asgi_app_answers_like_the_server() -> None:
    async def down() -> None:
        raise ConnectionError("nobody home")

    async def never() -> None:
        await asyncio.sleep(60)

    metrics.BOT_RATE_LIMITED.labels("test").inc()
    app = asgi_app(Probe({"store": down, "ray": never}, timeout_s=0.2))

    async def call(path: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "path": path, "method": "GET"}, None, send)
        return sent[0]["status"], sent[1]["body"]

    status, body = await call("/readyz")
    assert status == 503
    assert body == b"store: ConnectionError: nobody home\nray: no answer within 0.2s\n"
    status, body = await call("/metrics")
    assert status == 200 and b'atelier_bot_rate_limited_total{platform="test"}' in body
    assert await call("/nope") == (404, b"not found\n")


def test_json_log_lines_carry_the_job_id(caplog: pytest.LogCaptureFixture) -> None:
    fmt = JsonFormatter()
    log = logging.getLogger("atelier.test")
    record = log.makeRecord("atelier.test", logging.INFO, __file__, 1, "batch %s", ("b1",), None)
    JobFilter().filter(record)
    assert "job_id" not in json.loads(fmt.format(record))
    with job_context(["j1", "j2"]):
        record = log.makeRecord("atelier.test", logging.WARNING, __file__, 1, "x", (), None,
                                extra={"worker": "w0"})
        JobFilter().filter(record)
    line = json.loads(fmt.format(record))
    assert line["job_id"] == "j1,j2" and line["msg"] == "x" and line["worker"] == "w0"
    assert line["level"] == "WARNING" and line["logger"] == "atelier.test"


async def test_a_web_app_wrapped_with_the_probe_keeps_its_own_paths() -> None:
    seen: list[str] = []

    async def web(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"page"})

    async def fine() -> None:
        return None

    app = with_probe(web, Probe({"store": fine}), frozenset({"/metrics", "/readyz"}))

    async def call(path: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "path": path, "method": "GET"}, None, send)
        return sent[0]["status"], sent[1]["body"]

    assert await call("/readyz") == (200, b"store: ok\n")
    assert await call("/g/abc") == (200, b"page")
    assert await call("/healthz") == (200, b"page")  # the app's own
    assert seen == ["/g/abc", "/healthz"]
