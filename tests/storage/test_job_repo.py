"""Job rows: idempotent creation, valid transitions only, attempts, listing and concurrency."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlmodel import Session

from core.errors import Conflict, InvalidRequest, NotFound
from core.jobs import DeliveryTarget, JobStatus
from core.request import GenerationRequest, JobKind
from core.settings import Tier
from storage import jobs
from storage.accounts import AccountRead

Tx = Callable[[], AbstractContextManager[Session]]
DELIVERY = DeliveryTarget(frontend="discord", chat_id="c1", extra={"token": "t"})


def _create(
    tx: Tx, account: AccountRead, key: str, now: datetime, **request: object
) -> tuple[jobs.JobRead, bool]:
    with tx() as s:
        return jobs.create_job(
            session=s,
            idempotency_key=key,
            account_id=account.id,
            identity_id=account.identity.id if account.identity else None,
            request=GenerationRequest(prompt="a lighthouse", **request),  # type: ignore[arg-type]
            delivery=DELIVERY,
            cost=2,
            now=now,
        )


def test_duplicate_idempotency_key_returns_the_existing_job(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct = new_account()
    job, created = _create(tx, acct, "discord:interaction:1", now, styles=("anime",), seed=7)
    assert created and job.status == JobStatus.queued and job.attempts == 0
    again, created_again = _create(tx, acct, "discord:interaction:1", now + timedelta(seconds=5))
    assert not created_again
    assert again == job
    assert again.request.styles == ("anime",) and again.delivery == DELIVERY
    with pytest.raises(Conflict, match="another account"):
        _create(tx, new_account(), "discord:interaction:1", now)
    with pytest.raises(InvalidRequest):
        _create(tx, acct, "", now)


def test_request_with_image_bytes_round_trips(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    job, _ = _create(
        tx, new_account(), "k", now, kind=JobKind.img2img, init_image=b"\x89PNG\x00\xff"
    )
    with tx() as s:
        stored = jobs.get_job(session=s, job_id=job.id)
    assert stored.request.init_image == b"\x89PNG\x00\xff"


def test_status_transitions(tx: Tx, new_account: Callable[..., AccountRead], now: datetime) -> None:
    job, _ = _create(tx, new_account(), "k", now)
    later = now + timedelta(minutes=1)
    with tx() as s:
        running = jobs.set_status(session=s, job_id=job.id, status=JobStatus.running, now=later)
        assert running.started_at == later and running.finished_at is None
        assert jobs.set_status(session=s, job_id=job.id, status=JobStatus.running) == running
        jobs.set_status(session=s, job_id=job.id, status=JobStatus.queued, now=later)  # a retry
        jobs.set_status(session=s, job_id=job.id, status=JobStatus.running, now=later)
        done = jobs.set_status(
            session=s, job_id=job.id, status=JobStatus.succeeded, now=later + timedelta(seconds=9)
        )
    assert done.finished_at == later + timedelta(seconds=9) and done.started_at == later
    with pytest.raises(Conflict, match="is succeeded; it cannot become running"), tx() as s:
        jobs.set_status(session=s, job_id=job.id, status=JobStatus.running)
    with pytest.raises(NotFound), tx() as s:
        jobs.set_status(session=s, job_id="missing", status=JobStatus.running)

    other, _ = _create(tx, new_account(), "k2", now)
    with tx() as s:
        failed = jobs.set_status(
            session=s, job_id=other.id, status=JobStatus.failed, error="worker lost"
        )
    assert failed.error == "worker lost" and failed.status.finished


def test_record_attempt(tx: Tx, new_account: Callable[..., AccountRead], now: datetime) -> None:
    job, _ = _create(tx, new_account(), "k", now)
    with tx() as s:
        assert jobs.record_attempt(session=s, job_id=job.id).attempts == 1
        assert jobs.record_attempt(session=s, job_id=job.id, error="OOM").attempts == 2
        # Numbered attempts are idempotent: delivering attempt 2 again changes nothing.
        assert jobs.record_attempt(session=s, job_id=job.id, attempt=2).attempts == 2
        assert jobs.record_attempt(session=s, job_id=job.id, attempt=3).attempts == 3
        assert jobs.get_job(session=s, job_id=job.id).error == "OOM"


def test_list_jobs_and_running_count(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct = new_account()
    made = [_create(tx, acct, f"k{i}", now + timedelta(seconds=i))[0] for i in range(4)]
    with tx() as s:
        jobs.set_status(session=s, job_id=made[0].id, status=JobStatus.running)
        jobs.set_status(session=s, job_id=made[1].id, status=JobStatus.cancelled)
        assert jobs.running_jobs_count(session=s, account_id=acct.id) == 3
        listed = jobs.list_jobs(session=s, account_id=acct.id)
        queued = jobs.list_jobs(session=s, account_id=acct.id, status=JobStatus.queued)
    assert [j.id for j in listed] == [j.id for j in reversed(made)]
    assert [j.id for j in queued] == [made[3].id, made[2].id]


def test_mark_delivered_and_the_undelivered_scan(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct = new_account()
    ids = {}
    for name, status, finished in (
        ("old", JobStatus.succeeded, now - timedelta(days=2)),  # outside the window
        ("done", JobStatus.succeeded, now - timedelta(minutes=5)),
        ("failed", JobStatus.failed, now - timedelta(minutes=4)),
        ("recent", JobStatus.cancelled, now - timedelta(seconds=10)),  # within the grace
        ("running", JobStatus.running, now - timedelta(minutes=5)),
    ):
        job, _ = _create(tx, acct, name, finished - timedelta(seconds=1))
        ids[name] = job.id
        with tx() as s:
            if status is not JobStatus.cancelled:
                jobs.set_status(session=s, job_id=job.id, status=JobStatus.running, now=finished)
            if status is not JobStatus.running:
                jobs.set_status(session=s, job_id=job.id, status=status, now=finished)

    def scan(grace_s: float) -> list[str]:
        with tx() as s:
            rows = jobs.undelivered_jobs(
                session=s, finished_before=now - timedelta(seconds=grace_s),
                window=timedelta(days=1), limit=10,
            )
        return [j.id for j in rows]

    assert scan(60) == [ids["done"], ids["failed"]]  # oldest first
    assert scan(0) == [ids["done"], ids["failed"], ids["recent"]]
    with tx() as s:
        assert jobs.mark_delivered(session=s, job_id=ids["done"], now=now) is True
        assert jobs.mark_delivered(session=s, job_id=ids["done"]) is False
        assert jobs.get_job(session=s, job_id=ids["done"]).delivered_at == now
        with pytest.raises(Conflict, match="only a finished job"):
            jobs.mark_delivered(session=s, job_id=ids["running"])
        with pytest.raises(NotFound):
            jobs.mark_delivered(session=s, job_id="nope")
    assert scan(60) == [ids["failed"]]


def test_start_attempts_is_a_compare_and_set_on_the_lease(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    job, _ = _create(tx, new_account(), "lease", now)
    stale_before = now - timedelta(seconds=15)
    with tx() as s:
        won = jobs.start_attempts(session=s, job_ids=[job.id], now=now, stale_before=stale_before)
    assert won[job.id].status is JobStatus.running and won[job.id].attempts == 1
    # A second dispatcher holding the same job loses while the lease is fresh...
    later = now + timedelta(seconds=5)
    with tx() as s:
        assert jobs.start_attempts(session=s, job_ids=[job.id], now=later,
                                   stale_before=later - timedelta(seconds=15)) == {}
        assert [j[0] for j in jobs.in_flight_jobs(session=s, limit=10)] == [job.id]
    # ...and renewing keeps it fresh; once it lapses the job can be won again (attempt 2).
    with tx() as s:
        jobs.refresh_leases(session=s, job_ids=[job.id], now=later)
    lapsed = later + timedelta(seconds=20)
    with tx() as s:
        assert jobs.start_attempts(session=s, job_ids=[job.id], now=later + timedelta(seconds=10),
                                   stale_before=later - timedelta(seconds=1)) == {}
        again = jobs.start_attempts(session=s, job_ids=[job.id], now=lapsed,
                                    stale_before=lapsed - timedelta(seconds=15))
    assert again[job.id].attempts == 2 and again[job.id].started_at == won[job.id].started_at


def test_start_attempts_lets_a_restarted_dispatcher_take_back_its_own_running_job(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    job, _ = _create(tx, new_account(), "owned", now)
    fresh = now - timedelta(seconds=15)  # every lease below is fresh
    with tx() as s:
        won = jobs.start_attempts(session=s, job_ids=[job.id], now=now, stale_before=fresh,
                                  owner="box-up")
    assert won[job.id].owner == "box-up"
    with tx() as s:
        # Another dispatcher waits for the lease; the same name (its process restarted) not.
        assert jobs.start_attempts(session=s, job_ids=[job.id], now=now, stale_before=fresh,
                                   owner="elsewhere") == {}
        back = jobs.start_attempts(session=s, job_ids=[job.id], now=now, stale_before=fresh,
                                   owner="box-up")
    assert back[job.id].attempts == 2 and back[job.id].owner == "box-up"
def test_finish_and_release_refunds_once_and_leaves_finished_jobs_alone(
    tx: Tx, new_account: Callable[..., AccountRead], tiers: dict[str, Tier], now: datetime
) -> None:
    from storage import ledger
    from storage.models import utcnow

    now = utcnow()  # release() stamps the real time: a daily credit of another day would lapse
    acct = new_account()
    before = _balance(tx, acct, now, tiers)
    job, _ = _create(tx, acct, "k1", now)
    with tx() as s:
        ledger.reserve(session=s, account_id=acct.id, job_id=job.id, amount=2, now=now,
                       tiers=tiers)
    assert _balance(tx, acct, now, tiers) == before - 2
    with tx() as s:
        first, ended = jobs.end_unpaid(
            session=s, job_id=job.id, status=JobStatus.failed, error="the worker was lost"
        )
    assert first
    assert ended.status is JobStatus.failed and ended.error == "the worker was lost"
    assert _balance(tx, acct, now, tiers) == before  # refunded
    with tx() as s:  # a late cancel (a racing dispatcher) changes nothing
        again = jobs.finish_and_release(
            session=s, job_id=job.id, status=JobStatus.cancelled, error="cancelled"
        )
    assert again.status is JobStatus.failed and _balance(tx, acct, now, tiers) == before
    with tx() as s:  # and says that it did not end the job (so nothing counts it twice)
        assert jobs.end_unpaid(
            session=s, job_id=job.id, status=JobStatus.failed, error="again"
        ) == (False, again)
    with pytest.raises(InvalidRequest, match="not succeeded"), tx() as s:
        jobs.finish_and_release(
            session=s, job_id=job.id, status=JobStatus.succeeded, error="x"
        )


def _balance(tx: Tx, acct: AccountRead, now: datetime, tiers: dict[str, Tier]) -> int:
    from storage import ledger

    with tx() as s:
        return ledger.balance(session=s, account_id=acct.id, now=now, tiers=tiers).total


@pytest.mark.parametrize("job_id", ["x" * 65, "a\x00b"])
def test_job_ids_no_job_can_have_are_not_found(tx: Tx, job_id: str) -> None:
    with tx() as s, pytest.raises(NotFound):
        jobs.get_job(session=s, job_id=job_id)
