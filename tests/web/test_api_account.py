"""What an API key's owner can learn and is told: ``GET /api/v1/account`` (balance, tier,
limits, jobs in flight) and the per-tier "jobs at a time" refusal, a 429 ``too_many_jobs``
with ``Retry-After``."""

from __future__ import annotations

from storage import apikeys
from storage.db import transaction
from tests.web.conftest import Web
from tests.web.helpers import make_person

JOB = {"prompt": "a red fox", "model": "tiny", "width": 64, "height": 64, "steps": 2}


async def test_the_tier_s_job_cap_is_a_429_too_many_jobs_with_retry_after(web: Web) -> None:
    me = make_person(web.sessions)
    with transaction(web.sessions) as s:
        key = apikeys.create_api_key(session=s, identity_id=me.identity_id).key
    auth = {"Authorization": f"Bearer {key}"}
    cap = web.settings.tier("free").concurrency
    empty = await web.http.get("/api/v1/account", headers=auth)
    assert empty.status_code == 200, empty.text
    account = empty.json()
    assert account["tier"] == "free" and account["jobs_in_flight"] == 0
    assert account["limits"]["concurrency"] == cap
    assert account["limits"]["daily_allowance"] == web.settings.tier("free").daily_allowance
    assert account["limits"]["max_side"] == web.settings.tier("free").max_side
    assert account["balance"]["total"] == account["balance"]["daily_left"] == 10

    for _ in range(cap):  # no worker runs here: they stay queued
        made = await web.http.post("/api/v1/jobs", json=JOB, headers=auth)
        assert made.status_code == 201, made.text
    refused = await web.http.post("/api/v1/jobs", json=JOB, headers=auth)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "too_many_jobs"
    assert f"allows {cap} at a time" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1

    busy = (await web.http.get("/api/v1/account", headers=auth)).json()
    assert busy["jobs_in_flight"] == cap and busy["balance"]["total"] == 10 - cap
    assert (await web.http.get("/api/v1/account")).status_code == 401


async def test_the_openapi_docs_name_the_refusal_and_the_account(web: Web) -> None:
    spec = (await web.http.get("/openapi.json")).json()
    submit = spec["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert "too_many_jobs" in submit["429"]["description"]
    assert "Retry-After" in submit["429"]["headers"]
    assert "ErrorBody" in str(submit["422"])  # the one shape, not FastAPI's own
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {
        "error", "detail", "field"}
    assert "200" in spec["paths"]["/api/v1/account"]["get"]["responses"]
