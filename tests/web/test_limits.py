"""The request body limit (``web.limits``): a body over ATELIER_WEB_MAX_BODY_BYTES gets 413
with a JSON error, refused on its Content-Length before any of it is read, or cut off as soon
as a streamed one passes the limit; smaller bodies reach their routes as before."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from core.settings import load_settings
from tests.web.conftest import BASE, Web
from web.app import create_app

LIMIT = 64 * 1024
CHUNK = 16 * 1024


def _client(web: Web) -> httpx.AsyncClient:
    settings = web.settings.model_copy(update={"web_max_body_bytes": LIMIT})
    app = create_app(dataclasses.replace(web.ctx, settings=settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


def _refusal(r: httpx.Response) -> str:
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "body_too_large"
    detail: str = body["detail"]
    assert f"the limit is {LIMIT} bytes" in detail and "ATELIER_WEB_MAX_BODY_BYTES" in detail
    return detail


async def test_a_declared_length_over_the_limit_is_refused_unread(web: Web) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * CHUNK

    size = 100 * CHUNK
    async with _client(web) as http:
        r = await http.post("/api/v1/jobs", content=body(),
                            headers={"Content-Length": str(size)})
    assert f"the request body is {size} bytes" in _refusal(r)
    assert pulled <= 1  # nothing read but what the transport takes to start the request


async def test_a_streamed_body_is_cut_off_at_the_limit(web: Web) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(2000):  # 32 MB if it were all read
            pulled += 1
            yield b"x" * CHUNK

    async with _client(web) as http:
        # No Content-Length: chunked, as a client streaming a body sends it. Without a key
        # the route would say 401; the body is refused before the route runs.
        r = await http.post("/sdapi/v1/txt2img", content=body())
    assert "more than" in _refusal(r)
    assert pulled <= LIMIT // CHUNK + 2


async def test_bodies_within_the_limit_reach_their_routes(web: Web) -> None:
    async with _client(web) as http:
        r = await http.post("/api/v1/jobs", content=json.dumps({"prompt": "x" * 1000}),
                            headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text  # the route's own answer: no API key
        assert (await http.get("/healthz")).json() == {"status": "ok"}


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(_env_file=None).web_max_body_bytes == 8 * 1024 * 1024
    monkeypatch.setenv("ATELIER_WEB_MAX_BODY_BYTES", "2048")
    assert load_settings(_env_file=None).web_max_body_bytes == 2048
