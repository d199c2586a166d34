"""Jobs, for every front end: one admission (``admit`` validates, resolves the defaults, checks
the model's availability and prices a request once, returning a ``Quote``; ``submit`` writes
that quote without preparing it again), then cancelling and following a job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session

from cluster import accounts as account_rows
from cluster.adapters import add_triggers
from cluster.broker import Broker, BrokerUnavailable
from cluster.events import EventKind, ImageRef, JobEvent, image_ref, terminal_event, with_nsfw
from cluster.previews import control_preview
from cluster.registry import ModelRegistry
from cluster.runnable import RunnableModels
from core.adapters import AdapterRef, check_adapters
from core.cost import job_cost_for
from core.errors import (
    AtelierError,
    Conflict,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    TooManyJobs,
)
from core.jobs import CANCELLED_BY_OWNER, DeliveryTarget, JobStatus, Requester
from core.offload import run_heavy
from core.prompts import Blocklist, prepare_prompt
from core.recipe import effective_strength, min_denoising_steps
from core.request import GenerationRequest, check_text_lengths
from core.settings import Settings, Tier
from core.styles import StyleRegistry
from storage import accounts, gallery, ledger
from storage import jobs as job_repo
from storage.accounts import AccountRead
from storage.blobs import BlobStore
from storage.db import Store
from storage.gallery import ImageRead
from storage.jobs import JobRead
from storage.models import utcnow

log = logging.getLogger(__name__)

# How often events() re-reads the job row when no progress message arrives: the fallback that
# makes a lost pub/sub message (or a broker outage) cost latency, never the terminal event.
DEFAULT_POLL_INTERVAL_S = 0.5
# When a job slot may be free again: a hint for clients refused with TooManyJobs (Retry-After);
# a small job takes seconds, and asking again early costs one cheap refusal.
BUSY_RETRY_AFTER_S = 5.0

Prompts = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request as it runs and is priced (model, defaults, LoRAs and seed resolved) and the
    (prompt, negative) pairs the model sees, one per style."""

    request: GenerationRequest
    prompts: Prompts


@dataclass(frozen=True, slots=True)
class Quote:
    """What ``admit`` found: the prepared request and its price, or the job an idempotency key
    already made (``repeat_of``; nothing to post again). ``submit`` writes it as it is."""

    request: GenerationRequest
    cost: int
    credits: int | None  # what the person can spend now (None for a repeat)
    repeat_of: str | None
    requester: Requester | None = None
    idempotency_key: str = ""
    prompts: Prompts | None = None  # what the worker feeds the model


@dataclass(frozen=True, slots=True)
class SubmittedJob:
    """What ``submit`` accepted. ``created`` is False for a repeated idempotency key."""

    job_id: str
    status: JobStatus
    cost: int
    created: bool
    position: int | None  # queued jobs up to this one, all accounts (None once started)
    images_out: int


class Jobs:
    """Admission, cancelling and following of jobs. Every method is safe from any task."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Store,
        broker: Broker,
        blobs: BlobStore,
        styles: StyleRegistry,
        blocklist: Blocklist,
        models: ModelRegistry,
        runnable: RunnableModels | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.settings = settings
        self._db = db
        self.broker = broker
        self.blobs = blobs
        self.styles = styles
        self.blocklist = blocklist
        self.models = models
        self.runnable = runnable if runnable is not None else RunnableModels(models, broker)
        self.poll_interval_s = poll_interval_s

    # Admission -----------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, requester: Requester) -> Prepared:
        """Validate what needs no database and resolve the model name, what the person left to
        the model (size, steps, guidance, scheduler: its registry defaults) and the seed; make
        the prompts the model will see. The result is what runs and what is priced.

        Raises ContentBlocked (nothing is charged) or InvalidRequest naming the bad value.
        Costs time in proportion to the prompt: ``admit`` calls it off the loop.
        """
        # 0. The length, before anything reads the text (PromptTooLong naming the limit).
        check_text_lengths(request.prompt, request.negative, self.settings.limits)
        # 1. The model exists; what the person left out is the model's default; the size and
        #    steps are within what it supports.
        spec = self.models.get(request.model)
        request = request.with_model_defaults(spec.defaults)
        p = request.params()
        for side, value, top in (("width", p.width, spec.max_width),
                                 ("height", p.height, spec.max_height)):
            if value > top:
                raise InvalidRequest(f"{side} must be at most {top} for model {spec.name}, "
                                     f"got {value}")
        if p.steps > spec.max_steps:
            raise InvalidRequest(f"{spec.name} runs at most {spec.max_steps} steps, got {p.steps}")
        strength = effective_strength(request)
        if strength is not None and p.steps < (least := min_denoising_steps(strength)):
            raise InvalidRequest(
                f"{p.steps} steps at strength {strength:g} leave no denoising step; "
                f"use at least {least} steps"
            )
        # 2. LoRAs: the styles' own, then the request's (its weight wins for a name both
        #    give); each must be in the catalogue and fit the model's family. Their trigger
        #    words join the prompt where it lacks them.
        adapters = self._adapters(request, spec.name)
        prompt = add_triggers(request.prompt, adapters, self.models.adapters)
        request = request.model_copy(
            update={"adapters": adapters, "prompt": prompt, "model": spec.name}
        )
        # 3. A ControlNet unit: the ControlNet known and fitting the model's family.
        request = self.models.resolve_control(request)
        # 4. The blocklist, the styles exist, and the styled prompts (trigger words included)
        #    fit the text encoder (estimated tokens): the prompts the worker will use.
        prompts = tuple(
            prepare_prompt(request, self.styles, self.blocklist, requester.nsfw_allowed)
        )
        # 5. A concrete model and seed: a retry on another worker, or a rerun, is the same job.
        return Prepared(request.model_copy(update={"model": spec.name}).with_seed(), prompts)

    def _adapters(self, request: GenerationRequest, model: str) -> tuple[AdapterRef, ...]:
        given = {ref.name for ref in request.adapters}
        styled = [
            ref for name in request.styles for ref in self.styles.get(name).adapters()
            if ref.name not in given
        ]
        refs = check_adapters((*styled, *request.adapters))
        return self.models.resolve_adapters(refs, model)

    async def admit(
        self, request: GenerationRequest, requester: Requester, idempotency_key: str
    ) -> Quote:
        """Everything a request can be refused for before it is written, once: validated,
        defaults resolved, the model available, priced against the person's credits and
        tier. Writes nothing: a front end refuses before it posts anything, then ``submit``.

        Raises ContentBlocked, InvalidRequest, ModelUnavailable, TooManyJobs (a RateLimited),
        InsufficientCredits, or Conflict for another account's idempotency key.
        """
        # 1. Checks that need no database (the prompt's normalising, blocklist and token
        #    estimate off the loop), against one read of what the workers can load.
        check_text_lengths(request.prompt, request.negative, self.settings.limits)
        published = await self.runnable.published()
        request = await self.runnable.with_default(request, published)
        prepared = await asyncio.to_thread(self.prepare, request, requester)
        request = prepared.request
        if not idempotency_key or len(idempotency_key) > 200:
            raise InvalidRequest(
                f"idempotency key must be 1 to 200 characters, got {len(idempotency_key)}"
            )
        await self.runnable.check(request.model, published)
        now = utcnow()

        # 2. One read: a repeated key is the job it made; else the account (none on first
        #    contact: submit makes it with the default tier), its tier's limits and slots,
        #    and whether its credits cover the price.
        def read(session: Session) -> Quote:
            account = account_rows.find(session, requester)
            existing = job_repo.find_job(session=session, idempotency_key=idempotency_key)
            if existing is not None:
                if account is None or existing.account_id != account.id:
                    raise Conflict(
                        f"idempotency key {idempotency_key!r} belongs to another account's job"
                    )
                return Quote(request, existing.cost, None, existing.id, requester,
                             idempotency_key, prepared.prompts)
            if account is not None:
                accounts.refuse_blocked(account)  # AccountBlocked: nothing charged
            tier_name = account.tier if account is not None else self.settings.default_tier
            tier = self.settings.tier(tier_name)
            request.check_limits(self.settings.limits, max_side=tier.max_side)
            cost = job_cost_for(request, self.settings)
            if account is None:
                available = tier.daily_allowance
            else:
                _check_concurrency(session, account, tier)
                available = ledger.peek_balance(
                    session=session, account_id=account.id, now=now, tiers=self.settings.tiers
                ).total
            if available < cost:
                # As the reservation in submit would say it.
                raise InsufficientCredits(
                    f"this needs {cost} credit{'s' if cost != 1 else ''}; you have {available}",
                    needed=cost,
                    available=available,
                )
            return Quote(request, cost, available, None, requester, idempotency_key,
                         prepared.prompts)

        return await self._db(read, read_only=True)

    async def submit(self, quote: Quote, delivery: DeliveryTarget) -> SubmittedJob:
        """Write what ``admit`` quoted: charge (reserve) and queue it, exactly once per key,
        without preparing the request again.

        Raises TooManyJobs or InsufficientCredits when the slots or credits went since the
        quote; in every case nothing is charged and no job row is left behind.
        """
        requester, key, request = quote.requester, quote.idempotency_key, quote.request
        if requester is None or quote.prompts is None:
            raise InvalidRequest("submit takes a quote made by admit, got one without its "
                                 "requester or prompts")

        # 1. One transaction: the account (made on first contact), then a repeated key
        #    returns the job it made; else the tier's concurrency under the account lock, the
        #    job row and its reservation, and its place in the queue. An InsufficientCredits
        #    rolls both back: never a charge without a job, or the reverse.
        def create(session: Session) -> tuple[JobRead, bool, int | None]:
            account = account_rows.resolve(session, requester, self.settings)
            accounts.refuse_blocked(account)  # blocked since the quote: nothing charged
            existing = job_repo.find_job(session=session, idempotency_key=key)
            if existing is not None:
                if existing.account_id != account.id:
                    raise Conflict(f"idempotency key {key!r} belongs to another account's job")
                return existing, False, _position(session, existing)
            tier = self.settings.tier(account.tier)
            # The tier may have changed since the quote: its size limit again (no preparing).
            request.check_limits(self.settings.limits, max_side=tier.max_side)
            # The lock makes count-then-insert atomic on PostgreSQL too (SQLite: BEGIN IMMEDIATE).
            ledger.lock_accounts(session, [account.id])
            _check_concurrency(session, account, tier)
            job, created = job_repo.create_job(
                session=session,
                idempotency_key=key,
                account_id=account.id,
                identity_id=account.identity.id if account.identity else None,
                request=request,
                delivery=with_nsfw(delivery, requester.nsfw_allowed),
                cost=quote.cost,
                job_id=new_job_id(),
                prompts=quote.prompts,
            )
            if created:
                ledger.reserve(
                    session=session,
                    account_id=account.id,
                    job_id=job.id,
                    amount=quote.cost,
                    now=utcnow(),
                    tiers=self.settings.tiers,
                )
            return job, created, _position(session, job)

        job, created, position = await self._db(create)
        if not created:
            log.info("job %s: repeated idempotency key, nothing charged", job.id)
            return SubmittedJob(
                job.id, job.status, job.cost, False, position, job.request.images_out
            )

        # 2. Queue it. If the broker is down the job stays queued in the database and the
        #    dispatcher's reconciler enqueues it later (it compares the database with the
        #    broker): the person was charged for a job that will run, or be refunded.
        try:
            await self.broker.jobs.enqueue(job.id, {"account": str(job.account_id)})
        except BrokerUnavailable as exc:
            log.warning("job %s: not enqueued now (%s); the reconciler will", job.id, exc)
        log.info(
            "job %s: accepted for account %d (%d credits, %d images)",
            job.id, job.account_id, quote.cost, request.images_out,
        )
        log.debug("job %s: prompt %r", job.id, request.prompt)
        return SubmittedJob(job.id, job.status, quote.cost, True, position, request.images_out)

    async def live_jobs(self, frontend: str) -> list[JobRead]:
        """Queued and running jobs to be delivered to ``frontend`` (a restarted bot follows
        their progress again)."""
        jobs = await self._db(lambda s: job_repo.unfinished_jobs(session=s), read_only=True)
        return [j for j in jobs if j.delivery.frontend == frontend]

    async def position(self, job: JobRead) -> int | None:
        """Queued jobs created up to this one, across all accounts (None once started)."""
        if job.status is not JobStatus.queued:
            return None
        return await self._db(lambda s: _position(s, job), read_only=True)

    # Cancelling --------------------------------------------------------------------------

    async def cancel(self, job_id: str, requester: Requester) -> JobStatus:
        """Cancel the requester's job. Queued: cancelled and refunded now (returns
        ``cancelled``). Running: the dispatcher is asked to interrupt it and refund (returns
        ``running``; the job's events end with ``cancelled``, or ``done`` if it was too late).
        Raises Forbidden for someone else's job and Conflict once it finished."""

        def mark(session: Session) -> JobStatus:
            job = job_repo.get_job(session=session, job_id=job_id)  # NotFound
            account = account_rows.find(session, requester)
            if account is None or job.account_id != account.id:
                raise Forbidden(f"job {job_id} is not yours to cancel")
            if job.status.finished:
                raise Conflict(f"job {job_id} already finished ({job.status.value})")
            if job.status is JobStatus.running:
                return JobStatus.running
            job_repo.finish_and_release(
                session=session, job_id=job_id, status=JobStatus.cancelled,
                error=CANCELLED_BY_OWNER,
            )
            return JobStatus.cancelled

        status = await self._db(mark)
        try:
            # Also for a job just cancelled while queued: a dispatcher may have picked it up a
            # moment ago, and drops it at its next look at the flag.
            await self.broker.flags.request_cancel(job_id)
        except BrokerUnavailable:
            if status is JobStatus.running:
                raise
            log.warning("job %s: cancelled, but the broker did not take the flag", job_id)
        log.info("job %s: cancel asked while %s", job_id, status.value)
        return status

    # Following a job ---------------------------------------------------------------------

    async def events(self, job_id: str) -> AsyncGenerator[JobEvent, None]:
        """A job's story: queued (with position) or started, progress ticks (best effort),
        then exactly one terminal event (done, failed or cancelled), then the end.

        The terminal event always comes from the job row, which is re-read after subscribing
        (so a job finished before the call is reported) and every ``poll_interval_s``. A caller
        that stops early should close the iterator (``contextlib.aclosing``).
        """
        async with contextlib.AsyncExitStack() as stack:
            ticks: asyncio.Queue[JobEvent] = asyncio.Queue(maxsize=256)
            # 1. Subscribe first, then read the row: nothing can fall between the two.
            try:
                subscription = await stack.enter_async_context(
                    self.broker.progress.subscribe(job_id)
                )
                reader = asyncio.create_task(_pump(subscription, ticks, job_id))
                stack.push_async_callback(_stop, reader)
            except BrokerUnavailable as exc:
                log.info("job %s: no progress ticks (%s); following the database only", job_id, exc)
            job = await self.job(job_id)
            started = False
            if job.status is JobStatus.queued:
                yield JobEvent(EventKind.queued, job_id, position=await self.position(job))
            elif job.status is JobStatus.running:
                started = True
                yield JobEvent(EventKind.started, job_id)
            # 2. Ticks as they come; the row whenever the dispatcher hints at an end, or the
            #    poll interval passes without news.
            while not job.status.finished:
                try:
                    tick = await asyncio.wait_for(ticks.get(), self.poll_interval_s)
                except TimeoutError:
                    tick = None
                if tick is not None and not tick.terminal:
                    if not started and tick.kind in (EventKind.started, EventKind.progress):
                        started = True
                        yield JobEvent(EventKind.started, job_id)
                    if tick.kind is EventKind.progress:
                        yield tick
                    continue
                job = await self.job(job_id)
                if job.status is JobStatus.running and not started:
                    started = True
                    yield JobEvent(EventKind.started, job_id)
            # 3. Exactly one terminal event, from the row.
            images = await self._images(job_id) if job.status is JobStatus.succeeded else []
            yield terminal_event(job, images)

    async def wait(self, job_id: str) -> JobEvent:
        """The job's terminal event, once it finished."""
        # Closed here, not by the garbage collector: unsubscribing needs the broker still open.
        async with contextlib.aclosing(self.events(job_id)) as events:
            async for event in events:
                if event.terminal:
                    return event
        raise RuntimeError(f"job {job_id}: events ended without a terminal event")

    async def job(self, job_id: str) -> JobRead:
        """A job row; NotFound if there is none."""
        return await self._db(lambda s: job_repo.get_job(session=s, job_id=job_id), read_only=True)

    async def mark_delivered(self, job_id: str) -> bool:
        """Tell the store a finished job's result has reached its user. A front end calls this
        after it has sent the result and before it acks the delivery entry; until then the
        dispatcher re-announces the job (after a grace period, and at once when the broker
        restarts), so a lost delivery comes back. Idempotent: True the first time, False
        after. NotFound for an unknown job, Conflict for one that is not finished."""
        return await self._db(lambda s: job_repo.mark_delivered(session=s, job_id=job_id))

    async def _images(self, job_id: str) -> list[ImageRead]:
        return await self._db(
            lambda s: gallery.list_job_images(session=s, job_id=job_id), read_only=True
        )

    async def job_images(self, job_id: str) -> list[ImageRef]:
        """The stored images of a job, in index order (empty until it succeeded)."""
        return [image_ref(i) for i in await self._images(job_id)]

    async def image_bytes(self, image: ImageRef) -> bytes:
        """The PNG of a stored image."""
        return await asyncio.to_thread(self.blobs.get, image.blob_key)

    async def control_preview(self, request: GenerationRequest) -> bytes | None:
        """The PNG of a ControlNet request's control map, the preview shown with its result
        (None without a control unit): made once, in the heavy-work threads."""
        if request.control is None:
            return None
        return await run_heavy(control_preview, self.blobs, request)


def _position(session: Session, job: JobRead) -> int | None:
    if job.status is not JobStatus.queued:
        return None
    return job_repo.queue_position(session=session, job=job)


def _check_concurrency(session: Session, account: AccountRead, tier: Tier) -> None:
    """TooManyJobs when the account already has as many jobs in flight as its tier allows."""
    in_flight = job_repo.running_jobs_count(session=session, account_id=account.id)
    if in_flight >= tier.concurrency:
        raise TooManyJobs(
            f"you already have {in_flight} jobs queued or running; the {account.tier} "
            f"tier allows {tier.concurrency} at a time, so wait for one to finish",
            retry_after=BUSY_RETRY_AFTER_S,
        )


def new_job_id() -> str:
    return str(uuid.uuid4())


async def _stop(task: asyncio.Task[None]) -> None:
    # Not ``await task`` under suppress(CancelledError): that would swallow our own cancel.
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: _pump logs what it should itself


async def _pump(
    subscription: AsyncIterator[dict[str, Any]], out: asyncio.Queue[JobEvent], job_id: str
) -> None:
    """Move progress messages into ``out``; drop ticks when the reader falls behind."""
    try:
        async for message in subscription:
            try:
                event = JobEvent.from_fields(message)
            except AtelierError:
                log.debug("job %s: ignoring a progress message %r", job_id, message)
                continue
            if out.full() and not event.terminal:
                continue
            with contextlib.suppress(asyncio.QueueFull):
                out.put_nowait(event)
    except BrokerUnavailable as exc:
        # The poll of the job row carries on alone.
        log.info("job %s: progress ticks stopped (%s)", job_id, exc)
