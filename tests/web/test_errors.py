"""Errors at the web's edges: one JSON shape (``{"error", "detail", "field"?}``) for every
error, body-parse errors included; ids too large for the database and blob keys that lead
outside the store are "not found", never a 500."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from storage import apikeys
from storage.db import transaction
from storage.gallery import encode_cursor
from tests.web.conftest import Web
from tests.web.helpers import NOW, Person, add_job, gallery_link, make_person

HUGE = [2**31, 2**63, 10**30]


def _key(web: Web, person: Person) -> dict[str, str]:
    with transaction(web.sessions) as s:
        key = apikeys.create_api_key(session=s, identity_id=person.identity_id).key
    return {"Authorization": f"Bearer {key}"}


def _shape(reply: httpx.Response, status: int, error: str) -> dict[str, str]:
    assert reply.status_code == status, reply.text
    body: dict[str, str] = reply.json()
    assert body["error"] == error and isinstance(body["detail"], str) and body["detail"], body
    assert set(body) <= {"error", "detail", "field"}, body
    return body


async def _sign_in(web: Web, person: Person) -> None:
    link = gallery_link(web.key, person.account_id, now=web.clock(), ttl=timedelta(days=1))
    assert (await web.http.get(link)).status_code == 303


async def test_a_body_that_is_not_json_names_no_byte_offset(web: Web) -> None:
    auth = _key(web, make_person(web.sessions))
    headers = {**auth, "Content-Type": "application/json"}
    for path in ("/api/v1/jobs", "/sdapi/v1/txt2img"):
        reply = await web.http.post(path, content=b'{"prompt": "a cat",', headers=headers)
        body = _shape(reply, 422, "invalid_request")
        assert "field" not in body and "not valid JSON" in body["detail"], body
    missing = await web.http.post("/api/v1/jobs", headers=auth)
    assert "field" not in _shape(missing, 422, "invalid_request")


async def test_field_errors_name_the_field_once(web: Web) -> None:
    auth = _key(web, make_person(web.sessions))
    wrong = await web.http.post("/api/v1/jobs", json={"prompt": "a cat", "steps": "many"},
                                headers=auth)
    body = _shape(wrong, 422, "invalid_request")
    assert body["field"] == "steps" and body["detail"].startswith("steps: "), body
    tiling = await web.http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "tiling": True},
                                 headers=auth)
    body = _shape(tiling, 422, "invalid_request")
    assert body["field"] == "tiling" and body["detail"].count("tiling") == 1, body


async def test_the_framework_s_own_errors_have_the_shape_too(web: Web) -> None:
    _shape(await web.http.get("/api/v1/nothing-here"), 404, "not_found")
    _shape(await web.http.delete("/api/v1/jobs"), 405, "method_not_allowed")
    await _sign_in(web, make_person(web.sessions))
    body = _shape(await web.http.get("/gallery/zip?ids=abc"), 422, "invalid_request")
    assert body["field"] == "ids.0", body


@pytest.mark.parametrize("big", HUGE)
async def test_ids_too_large_for_the_database_are_not_found(web: Web, big: int) -> None:
    me = make_person(web.sessions)
    auth = _key(web, me)
    add_job(web.sessions, web.blobs, me, "a cat")
    for path in (f"/api/v1/images/{big}", f"/api/v1/images/{big}/png"):
        _shape(await web.http.get(path, headers=auth), 404, "not_found")
    cursor = encode_cursor(NOW, big)
    reply = await web.http.get(f"/api/v1/images?before={cursor}", headers=auth)
    _shape(reply, 422, "invalid_request")
    await _sign_in(web, me)
    for path in (f"/gallery/image/{big}", f"/gallery/image/{big}.png",
                 f"/gallery/thumb/{big}.webp", f"/gallery/zip?ids={big}",
                 f"/gallery?before={cursor}"):
        assert (await web.http.get(path)).status_code in (404, 422), path


async def test_job_ids_no_job_can_have_are_not_found(web: Web) -> None:
    auth = _key(web, make_person(web.sessions))
    for job_id in ("x" * 65, "a%00b"):
        _shape(await web.http.get(f"/api/v1/jobs/{job_id}", headers=auth), 404, "not_found")


async def test_a_blob_leading_outside_the_store_is_not_found_and_logged(
    web: Web, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    me = make_person(web.sessions)
    auth = _key(web, me)
    image = add_job(web.sessions, web.blobs, me, "a cat")[0]
    secret = tmp_path / "secret.png"
    blob = web.blobs.root / image.blob_key
    secret.write_bytes(blob.read_bytes())
    blob.unlink()
    os.symlink(secret, blob)  # the row's file now leads out of the store
    await _sign_in(web, me)
    with caplog.at_level(logging.WARNING, "storage.blobs"):
        assert (await web.http.get(f"/gallery/image/{image.id}.png")).status_code == 404
        assert (await web.http.get(f"/gallery/thumb/{image.id}.webp")).status_code == 404
        reply = await web.http.get(f"/api/v1/images/{image.id}/png", headers=auth)
        _shape(reply, 404, "not_found")
    assert "outside the blob store" in caplog.text


async def test_variations_of_an_image_whose_file_is_gone_are_not_found(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a cat")[0]
    (web.blobs.root / image.blob_key).unlink()
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=timedelta(days=1))
    await web.http.get(link)
    page = await web.http.get(f"/gallery/image/{image.id}")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    reply = await web.http.post(f"/gallery/image/{image.id}/make",
                                data={"csrf": csrf, "nonce": "n", "mode": "variations"})
    assert reply.status_code == 404, reply.text
