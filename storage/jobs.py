"""Job rows: created once per idempotency key, moved through valid status transitions only."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import and_, func, literal, literal_column, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import Conflict, InvalidRequest, NotFound
from core.jobs import DeliveryTarget, JobStatus
from core.request import GenerationRequest
from storage import ledger
from storage.models import Job, UTCDateTime, utcnow

# Which status may follow which. running -> queued is a retry on another worker.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.running: frozenset(
        {JobStatus.queued, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
    ),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}
JOB_ID_MAX = 64  # Job.id's column length
IN_FLIGHT = (JobStatus.queued, JobStatus.running)
# The queue as SQL with literal statuses, so that both databases match it against the partial
# index ix_jobs_in_flight (neither proves a partial index's predicate from bound parameters).
IN_FLIGHT_SQL = col(Job.status).in_([literal_column(f"'{s.value}'") for s in IN_FLIGHT])
# The statuses a front end gets a delivery for (the terminal event).
FINISHED = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobRead(BaseModel):
    id: str
    idempotency_key: str
    account_id: int
    identity_id: int | None
    request: GenerationRequest
    status: JobStatus
    attempts: int
    error: str | None
    delivery: DeliveryTarget
    cost: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    delivered_at: datetime | None = None
    owner: str | None = None  # the dispatcher that last started it
    # What admission prepared for the model, (prompt, negative) per style; None for old rows.
    prompts: tuple[tuple[str, str], ...] | None = None


def create_job(
    *,
    session: Session,
    idempotency_key: str,
    account_id: int,
    identity_id: int | None,
    request: GenerationRequest,
    delivery: DeliveryTarget,
    cost: int,
    job_id: str | None = None,
    now: datetime | None = None,
    prompts: Sequence[tuple[str, str]] | None = None,
) -> tuple[JobRead, bool]:
    """Insert a queued job; returns ``(job, created)``. A duplicate idempotency key (a retried
    Discord interaction, a re-sent Telegram update) returns the existing job, ``created=False``.
    ``job_id`` lets the caller reserve credits under the id before the row exists; ``prompts``:
    the prepared (prompt, negative) pairs the worker is to use as they are."""
    if not idempotency_key or len(idempotency_key) > 200:
        raise InvalidRequest(
            f"idempotency key must be 1 to 200 characters, got {len(idempotency_key)}"
        )
    if cost < 0:
        raise InvalidRequest(f"cost must not be negative, got {cost}")
    existing = _by_key(session, idempotency_key)
    if existing is None:
        now = now or utcnow()
        job = Job(
            id=job_id or str(uuid.uuid4()),
            idempotency_key=idempotency_key,
            account_id=account_id,
            identity_id=identity_id,
            request_json=request.model_dump_json(),
            status=JobStatus.queued,
            delivery_json=delivery.model_dump_json(),
            cost=cost,
            created_at=now,
            updated_at=now,
            prompts_json=json.dumps([list(p) for p in prompts]) if prompts is not None else None,
        )
        try:
            with session.begin_nested():
                session.add(job)
                session.flush()
            return _read(job), True
        except IntegrityError:
            existing = _by_key(session, idempotency_key)
            if existing is None:
                raise Conflict(f"job id {job.id} is already taken") from None
    if existing.account_id != account_id:
        raise Conflict(f"idempotency key {idempotency_key!r} belongs to another account's job")
    return _read(existing), False


def get_job(*, session: Session, job_id: str) -> JobRead:
    return _read(_load(session, job_id))


def find_job(*, session: Session, idempotency_key: str) -> JobRead | None:
    job = _by_key(session, idempotency_key)
    return None if job is None else _read(job)


def finish_and_release(
    *, session: Session, job_id: str, status: JobStatus, error: str
) -> JobRead:
    """End an unfinished job as ``status`` (failed or cancelled) and release its reserved
    credits, in the caller's transaction: the one way a job ends without being charged. A job
    that finished meanwhile (a racing dispatcher, a cancel) is returned as it is."""
    return end_unpaid(session=session, job_id=job_id, status=status, error=error)[1]


def end_unpaid(
    *, session: Session, job_id: str, status: JobStatus, error: str
) -> tuple[bool, JobRead]:
    """``finish_and_release``, and whether this call ended the job: a job that a racing pass
    (or a duplicate entry) already ended is counted by that one, not again."""
    if not status.finished or status is JobStatus.succeeded:
        raise InvalidRequest(f"a job ends unpaid as failed or cancelled, not {status.value}")
    job = get_job(session=session, job_id=job_id)
    if job.status.finished:
        return False, job
    set_status(session=session, job_id=job_id, status=status, error=error)
    ledger.release(session=session, job_id=job_id)
    return True, get_job(session=session, job_id=job_id)


def set_status(
    *,
    session: Session,
    job_id: str,
    status: JobStatus,
    error: str | None = None,
    now: datetime | None = None,
) -> JobRead:
    """Move a job to ``status``. Setting the status it already has is a no-op (at-least-once
    callers repeat themselves); any transition not in ``TRANSITIONS`` raises Conflict."""
    now = now or utcnow()
    while True:
        job = _load(session, job_id)
        current = JobStatus(job.status)
        if current == status:
            return _read(job)
        if status not in TRANSITIONS[current]:
            raise Conflict(f"job {job_id} is {current.value}; it cannot become {status.value}")
        values: dict[str, object] = {"status": status, "updated_at": now}
        if status == JobStatus.running and job.started_at is None:
            values["started_at"] = now
        if status.finished:
            values["finished_at"] = now
        if error is not None:
            values["error"] = error
        # Conditional on the status we read, so two racing writers cannot both win.
        result = session.exec(
            update(Job)
            .where(col(Job.id) == job_id, col(Job.status) == current)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            return _read(_load(session, job_id))


def record_attempt(
    *,
    session: Session,
    job_id: str,
    attempt: int | None = None,
    error: str | None = None,
    now: datetime | None = None,
) -> JobRead:
    """Count a dispatch attempt. With ``attempt`` (1-based) it is idempotent: the count becomes
    at least ``attempt``; without, it goes up by one."""
    now = now or utcnow()
    _load(session, job_id)
    if attempt is not None and attempt < 1:
        raise InvalidRequest(f"attempt numbers start at 1, got {attempt}")
    values: dict[str, object] = {
        "attempts": col(Job.attempts) + 1 if attempt is None else attempt,
        "updated_at": now,
    }
    if error is not None:
        values["error"] = error
    stmt = update(Job).where(col(Job.id) == job_id)
    if attempt is not None:
        stmt = stmt.where(col(Job.attempts) < attempt)
    session.exec(stmt.values(**values).execution_options(synchronize_session=False))
    return _read(_load(session, job_id))


def list_jobs(
    *,
    session: Session,
    account_id: int,
    status: JobStatus | None = None,
    limit: int = 50,
) -> list[JobRead]:
    """An account's jobs, newest first."""
    if not 1 <= limit <= 500:
        raise InvalidRequest(f"limit must be between 1 and 500, got {limit}")
    stmt = select(Job).where(Job.account_id == account_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    stmt = stmt.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit)
    return [_read(j) for j in session.exec(stmt).all()]


def mark_delivered(*, session: Session, job_id: str, now: datetime | None = None) -> bool:
    """Record that the front end has sent a finished job's result; from then on the dispatcher
    no longer re-announces it. Idempotent: True the first time, False when already marked.
    A job that is not finished yet cannot have been delivered (Conflict)."""
    job = _load(session, job_id)
    if not JobStatus(job.status).finished:
        raise Conflict(f"job {job_id} is {JobStatus(job.status).value}; only a finished job "
                       "can be delivered")
    result = session.exec(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.delivered_at).is_(None))
        .values(delivered_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)


def undelivered_jobs(
    *,
    session: Session,
    finished_before: datetime,
    window: timedelta,
    limit: int = 500,
) -> list[JobRead]:
    """Finished jobs no front end has marked delivered, that finished before
    ``finished_before`` and within ``window`` of it; oldest first, at most ``limit``."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequest(f"limit must be between 1 and 10000, got {limit}")
    stmt = (
        select(Job)
        .where(
            col(Job.delivered_at).is_(None),
            col(Job.finished_at) < finished_before,
            col(Job.finished_at) >= finished_before - window,
            col(Job.status).in_(FINISHED),
        )
        .order_by(col(Job.finished_at), col(Job.id))
        .limit(limit)
    )
    return [_read(j) for j in session.exec(stmt).all()]


def undelivered_count(*, session: Session, since: datetime) -> int:
    """Finished jobs (since ``since``) no front end has marked delivered yet."""
    count = session.exec(
        select(func.count())
        .select_from(Job)
        .where(
            col(Job.delivered_at).is_(None),
            col(Job.finished_at) >= since,
            col(Job.status).in_(FINISHED),
        )
    ).one()
    return int(count)


def unfinished_jobs(*, session: Session, limit: int = 1000) -> list[JobRead]:
    """Queued and running jobs, oldest first (a restarted front end follows its own again):
    a walk of ix_jobs_in_flight that stops at ``limit``."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequest(f"limit must be between 1 and 10000, got {limit}")
    stmt = (
        select(Job)
        .where(IN_FLIGHT_SQL)
        .order_by(col(Job.created_at), col(Job.id))
        .limit(limit)
    )
    return [_read(j) for j in session.exec(stmt).all()]


def running_jobs_count(*, session: Session, account_id: int) -> int:
    """Jobs in flight (queued or running), to hold an account to its tier's concurrency."""
    count = session.exec(
        select(func.count())
        .select_from(Job)
        .where(Job.account_id == account_id, col(Job.status).in_(IN_FLIGHT))
    ).one()
    return int(count)


def queue_position(*, session: Session, job: JobRead) -> int:
    """1 for the oldest queued job: queued jobs created up to this one, across all accounts
    (wherever they wait: in the stream or in a dispatcher's read-ahead window)."""
    ahead = session.exec(
        select(func.count())
        .select_from(Job)
        .where(col(Job.status) == JobStatus.queued, col(Job.created_at) <= job.created_at)
    ).one()
    return max(1, int(ahead))


def _by_key(session: Session, idempotency_key: str) -> Job | None:
    return session.exec(
        select(Job)
        .where(Job.idempotency_key == idempotency_key)
        .execution_options(populate_existing=True)
    ).first()


def _load(session: Session, job_id: str) -> Job:
    # Longer than the column or with a NUL (PostgreSQL refuses it in any text): no job's id.
    if len(job_id) > JOB_ID_MAX or "\x00" in job_id:
        raise NotFound(f"job {job_id[:JOB_ID_MAX]!r} does not exist")
    job = session.exec(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).first()
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def _read(job: Job) -> JobRead:
    return JobRead(
        id=job.id,
        idempotency_key=job.idempotency_key,
        account_id=job.account_id,
        identity_id=job.identity_id,
        request=GenerationRequest.model_validate_json(job.request_json),
        status=job.status,
        attempts=job.attempts,
        error=job.error,
        delivery=DeliveryTarget.model_validate_json(job.delivery_json),
        cost=job.cost,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        delivered_at=job.delivered_at,
        owner=job.owner,
        prompts=_prompts(job.prompts_json),
    )


def _prompts(text: str | None) -> tuple[tuple[str, str], ...] | None:
    if text is None:
        return None
    return tuple((str(p), str(n)) for p, n in json.loads(text))


# Dispatcher leases -------------------------------------------------------------------------------


def start_attempts(
    *, session: Session, job_ids: Sequence[str], now: datetime, stale_before: datetime,
    owner: str | None = None,
) -> dict[str, JobRead]:
    """Move each job to running and count an attempt, if it is queued or running with a lapsed
    lease; a compare-and-set, so of two dispatchers holding the same job only one wins it.
    ``owner`` (the dispatcher's unique name) is recorded, and a job running under that name
    already is taken back at once: its holder was this dispatcher's previous process.
    Returns the won jobs' rows."""
    won: dict[str, JobRead] = {}
    running = col(Job.status) == JobStatus.running
    takeable = [
        col(Job.status) == JobStatus.queued, and_(running, col(Job.updated_at) < stale_before)
    ]
    if owner is not None:
        takeable.append(and_(running, col(Job.owner) == owner))
    for job_id in job_ids:
        result = session.exec(  # type: ignore[call-overload]
            update(Job)
            .where(col(Job.id) == job_id, or_(*takeable))
            .values(
                status=JobStatus.running,
                owner=owner,
                attempts=col(Job.attempts) + 1,
                started_at=func.coalesce(col(Job.started_at), literal(now, UTCDateTime())),
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            won[job_id] = get_job(session=session, job_id=job_id)
    return won


def refresh_leases(*, session: Session, job_ids: Sequence[str], now: datetime) -> None:
    """Renew the lease (``updated_at``) of running jobs this dispatcher is working on."""
    session.exec(  # type: ignore[call-overload]
        update(Job)
        .where(col(Job.id).in_(job_ids), col(Job.status) == JobStatus.running)
        .values(updated_at=now)
        .execution_options(synchronize_session=False)
    )


def in_flight_jobs(
    *, session: Session, limit: int
) -> list[tuple[str, int, JobStatus, datetime]]:
    """(id, account, status, updated_at) of queued and running jobs, oldest first: a walk of
    ix_jobs_in_flight that stops at ``limit``."""
    rows = session.exec(
        select(Job.id, Job.account_id, Job.status, Job.updated_at)
        .where(IN_FLIGHT_SQL)
        .order_by(col(Job.created_at), col(Job.id))
        .limit(limit)
    ).all()
    return [(r[0], r[1], JobStatus(r[2]), r[3]) for r in rows]


def in_flight_count(*, session: Session) -> int:
    """How many jobs are queued or running (from ix_jobs_in_flight, the queue's own index):
    the reconciler compares it with the broker's entries before reading any job."""
    return int(session.exec(select(func.count()).select_from(Job).where(IN_FLIGHT_SQL)).one())
