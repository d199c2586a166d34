"""REST /api/v1 on a live uvicorn: submit with an Idempotency-Key (one job, one charge), read
the job and its SSE events, cancel, the gallery images; errors as JSON naming the field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

from core.infotext import read_png_infotext
from core.jobs import JobStatus
from tests.web.api.conftest import WebStack

TINY = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
async def http(web: WebStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.url, timeout=60) as client:
        yield client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _finished(http: httpx.AsyncClient, key: str, job_id: str) -> dict[str, Any]:
    # Twice a second: within the key's rate limit (120 a minute), however slow the job.
    for _ in range(120):
        reply = await http.get(f"/api/v1/jobs/{job_id}", headers=_auth(key))
        assert reply.status_code == 200, reply.text
        job: dict[str, Any] = reply.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


async def test_same_idempotency_key_twice_is_one_job_and_one_charge(
    web: WebStack, http: httpx.AsyncClient
) -> None:
    key = web.new_key("201")
    before = await web.balance("201")
    headers = {**_auth(key), "Idempotency-Key": "order-42"}
    body = {"prompt": "a lighthouse at dusk", "seed": 77, **TINY}
    first = await http.post("/api/v1/jobs", json=body, headers=headers)
    second = await http.post("/api/v1/jobs", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["job_id"] == second.json()["job_id"]
    assert (first.json()["created"], second.json()["created"]) == (True, False)
    job = await _finished(http, key, first.json()["job_id"])
    assert job["status"] == "succeeded" and job["request"]["seed"] == 77
    assert len(web.jobs()) == 1
    assert await web.balance("201") == before - job["cost"] == before - 1
    (image,) = job["images"]
    png = await http.get(image["png_url"], headers=_auth(key))
    assert png.headers["content-type"] == "image/png"
    assert "Seed: 77" in (read_png_infotext(png.content) or "")
    assert web.jobs()[0].delivered_at is not None  # the API showed the outcome

    listed = (await http.get("/api/v1/images", headers=_auth(key))).json()
    assert [i["id"] for i in listed["items"]] == [image["id"]]
    found = (await http.get("/api/v1/images?q=lighthouse", headers=_auth(key))).json()
    assert len(found["items"]) == 1
    assert (await http.get("/api/v1/images?q=zebra", headers=_auth(key))).json()["items"] == []
    meta = (await http.get(f"/api/v1/images/{image['id']}", headers=_auth(key))).json()
    assert meta["seed"] == 77 and meta["prompt"].startswith("a lighthouse at dusk")


async def _sse(http: httpx.AsyncClient, key: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    async with http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=_auth(key)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


async def test_events_stream_the_job_then_end(web: WebStack, http: httpx.AsyncClient) -> None:
    key = web.new_key("202")
    await web.stop_dispatcher()  # queued first, so the stream starts at the beginning
    made = await http.post(
        "/api/v1/jobs", json={"prompt": "a slow river", "width": 256, "height": 256,
                              "steps": 12}, headers=_auth(key),
    )
    job_id = made.json()["job_id"]
    stream = asyncio.create_task(_sse(http, key, job_id))
    await asyncio.sleep(0.5)
    await web.start_dispatcher()
    events = await asyncio.wait_for(stream, 120)
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and events[0][1]["position"] == "1"
    assert "started" in kinds and kinds[-1] == "done"
    steps = [int(d["step"]) for k, d in events if k == "progress"]
    assert steps and steps == sorted(steps) and events[-1][1]["images"][0]["seed"] >= 0
    assert web.jobs()[0].delivered_at is not None


async def test_cancel_refunds_a_queued_job(web: WebStack, http: httpx.AsyncClient) -> None:
    key = web.new_key("203")
    before = await web.balance("203")
    await web.stop_dispatcher()
    job_id = (await http.post("/api/v1/jobs", json={"prompt": "x", **TINY},
                              headers=_auth(key))).json()["job_id"]
    assert await web.balance("203") == before - 1
    cancelled = await http.post(f"/api/v1/jobs/{job_id}/cancel", headers=_auth(key))
    assert cancelled.json() == {"job_id": job_id, "status": "cancelled"}
    assert await web.balance("203") == before
    again = await http.post(f"/api/v1/jobs/{job_id}/cancel", headers=_auth(key))
    assert again.status_code == 409 and again.json()["error"] == "conflict"


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "width": 100}, "width"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"width": 64}, "prompt"),
        ({"prompt": "x", "kind": "img2img"}, "init_image"),
        ({"prompt": "x", "kind": "inpaint", "init_image": _png_b64()}, "mask"),
        ({"prompt": "x", "kind": "img2img", "init_image": "%%%"}, "init_image"),
        ({"prompt": "x", "kind": "img2img", "init_image": base64.b64encode(b"nope").decode()},
         "init_image"),
        ({"prompt": "x", "steps": 51, "width": 64, "height": 64}, "steps"),
        ({"prompt": "x", "model": "nope"}, "model"),
    ],
)
async def test_bad_fields_get_422_naming_them(
    web: WebStack, http: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    key = web.new_key("204")
    r = await http.post("/api/v1/jobs", json=body, headers=_auth(key))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert web.jobs() == []


async def test_img2img_through_rest(web: WebStack, http: httpx.AsyncClient) -> None:
    key = web.new_key("205")
    r = await http.post(
        "/api/v1/jobs", headers=_auth(key),
        json={"prompt": "green", "kind": "img2img", "init_image": "data:image/png;base64,"
              + _png_b64(), "strength": 0.6, **{**TINY, "steps": 4}},
    )
    assert r.status_code == 201, r.text
    job = await _finished(http, key, r.json()["job_id"])
    assert job["status"] == "succeeded" and job["request"]["kind"] == "img2img"
    assert "Denoising strength: 0.6" in job["images"][0]["infotext"]


async def test_keys_and_ownership(web: WebStack, http: httpx.AsyncClient) -> None:
    alice, bob = web.new_key("206"), web.new_key("207")
    made = await http.post("/api/v1/jobs", json={"prompt": "mine", **TINY}, headers=_auth(alice))
    job = await _finished(http, alice, made.json()["job_id"])
    image_id = job["images"][0]["id"]
    for path in (f"/api/v1/jobs/{job['id']}", f"/api/v1/images/{image_id}",
                 f"/api/v1/images/{image_id}/png", f"/api/v1/jobs/{job['id']}/events"):
        r = await http.get(path, headers=_auth(bob))
        assert r.status_code == 404, path
        assert "mine" not in r.text
    assert (await http.get("/api/v1/images", headers=_auth(bob))).json()["items"] == []

    assert (await http.get("/api/v1/images")).status_code == 401
    wrong = await http.get("/api/v1/images", headers=_auth(alice[:-1] + "_"))
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    web.revoke(alice)
    revoked = await http.get(f"/api/v1/jobs/{job['id']}", headers=_auth(alice))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    assert (await http.get("/api/v1/images", headers=_auth(bob))).status_code == 200


async def test_openapi_docs(web: WebStack, http: httpx.AsyncClient) -> None:
    assert (await http.get("/docs")).status_code == 200
    paths = (await http.get("/openapi.json")).json()["paths"]
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/api/v1/images",
                 "/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/options"):
        assert path in paths, path
    assert JobStatus.succeeded.value in json.dumps(paths)


async def test_a_job_nobody_polls_is_delivered_to_the_gallery(
    web: WebStack, http: httpx.AsyncClient
) -> None:
    import redis.asyncio as redis

    from cluster import keys

    key = web.new_key("208")
    made = await http.post("/api/v1/jobs", json={"prompt": "unwatched", **TINY},
                           headers=_auth(key))
    await web.client.wait(made.json()["job_id"])
    for _ in range(100):
        if web.jobs()[0].delivered_at is not None:
            break
        await asyncio.sleep(0.1)
    assert web.jobs()[0].delivered_at is not None
    r = redis.Redis.from_url(str(web.settings.redis_url), decode_responses=True)
    try:  # acknowledged right after it is marked delivered (not before: nothing is lost)
        for _ in range(100):
            pending = await r.xpending(keys.deliveries_stream("web"), keys.delivery_group("web"))
            if pending["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        assert pending["pending"] == 0
    finally:
        await r.aclose()


async def test_fields_left_out_are_the_models_defaults(
    web: WebStack, http: httpx.AsyncClient
) -> None:
    # Nothing but a prompt: the default model's size, steps, guidance and sampler (tiny:
    # 64x64, 4 steps, cfg 7, Euler), not 512x512 / 20 / 7 / "Euler a" of the API's own.
    key = web.new_key("207")
    r = await http.post("/api/v1/jobs", json={"prompt": "a lighthouse", "seed": 3},
                        headers=_auth(key))
    assert r.status_code == 201, r.text
    job = await _finished(http, key, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    spec = web.client.models.get("tiny")
    wanted = [spec.default_width, spec.default_height, spec.default_steps, spec.guidance,
              spec.scheduler]
    assert [job["request"][f] for f in ("width", "height", "steps", "guidance", "scheduler")
            ] == wanted
    assert job["images"][0]["width"] == spec.default_width


async def test_loras_field_is_taken_resolved_and_reported(
    web: WebStack, http: httpx.AsyncClient
) -> None:
    key = web.new_key("231")
    body = {"prompt": "a lighthouse", "seed": 5, "loras": [{"name": "ink", "weight": 0.5}], **TINY}
    reply = await http.post("/api/v1/jobs", json=body, headers=_auth(key))
    assert reply.status_code == 201, reply.text
    job = await _finished(http, key, reply.json()["job_id"])
    assert job["status"] == "succeeded"
    assert job["loras"] == [{"name": "ink", "weight": 0.5}]
    assert "<lora:ink:0.5>" in job["images"][0]["infotext"]
    # Left without a weight: the catalogue's default, reported as resolved.
    plain = await http.post("/api/v1/jobs", json={**body, "loras": [{"name": "ink"}]},
                            headers=_auth(key))
    assert (await _finished(http, key, plain.json()["job_id"]))["loras"] == [
        {"name": "ink", "weight": 1.0}
    ]
    bad = await http.post("/api/v1/jobs", json={**body, "loras": [{"name": "inc"}]},
                          headers=_auth(key))
    assert bad.status_code == 422 and "unknown LoRA 'inc'" in bad.json()["detail"]
