"""The one door front ends use: submit, cancel and follow jobs, plus the account helpers they need
(balance, history, images, link codes). Blocking database work runs in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, func, select

from cluster.adapters import add_triggers
from cluster.availability import loadable_models, model_availability
from cluster.broker import Broker, BrokerUnavailable
from cluster.events import EventKind, ImageRef, JobEvent, image_ref, terminal_event, with_nsfw
from cluster.registry import ModelRegistry, how_to_get
from core.adapters import AdapterRef, check_adapters
from core.cost import job_cost_for
from core.errors import (
    AtelierError,
    Conflict,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    TooManyJobs,
)
from core.jobs import CANCELLED_BY_OWNER, DeliveryTarget, JobStatus, Requester
from core.prompts import Blocklist, prepare_prompt
from core.recipe import effective_strength, min_denoising_steps
from core.request import GenerationRequest, check_text_lengths
from core.settings import Settings, Tier
from core.styles import StyleRegistry
from storage import accounts, apikeys, gallery, ledger
from storage import jobs as job_repo
from storage.accounts import AccountRead, LinkCodeRead
from storage.apikeys import NewApiKey
from storage.blobs import BlobStore
from storage.db import Store
from storage.gallery import ImageRead
from storage.jobs import JobRead
from storage.ledger import Balance
from storage.models import Job, utcnow

log = logging.getLogger(__name__)

# How often events() re-reads the job row when no progress message arrives: the fallback that
# makes a lost pub/sub message (or a broker outage) cost latency, never the terminal event.
DEFAULT_POLL_INTERVAL_S = 0.5
# When a job slot may be free again: a hint for clients refused with TooManyJobs (Retry-After);
# a small job takes seconds, and asking again early costs one cheap refusal.
BUSY_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class SubmittedJob:
    """What ``submit`` accepted. ``created`` is False for a repeated idempotency key."""

    job_id: str
    status: JobStatus
    cost: int
    created: bool
    position: int | None  # queued jobs up to this one, all accounts (None once started)
    images_out: int


@dataclass(frozen=True, slots=True)
class Quote:
    """What ``quote`` found: the prepared request and its price, or the job an idempotency key
    already made (``repeat_of``; nothing to post again)."""

    request: GenerationRequest
    cost: int
    credits: int | None  # what the person can spend now (None for a repeat)
    repeat_of: str | None


class Client:
    """Front ends' access to the cluster. Every method is safe to call from any task."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: sessionmaker[Session],
        broker: Broker,
        blobs: BlobStore,
        styles: StyleRegistry,
        blocklist: Blocklist,
        models: ModelRegistry,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        # The registries come from the composition root (atelier/app.py), loaded once there.
        self.settings = settings
        self.sessions = session_factory
        self._db = Store(session_factory)
        self.broker = broker
        self.blobs = blobs
        self.styles = styles
        self.blocklist = blocklist
        self.models = models
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive, got {poll_interval_s}")
        self.poll_interval_s = poll_interval_s

    # Submitting --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, requester: Requester) -> GenerationRequest:
        """Validate what needs no database and resolve the model name, what the person left to
        the model (size, steps, guidance, scheduler: its registry defaults) and the seed. The
        result is what runs and what is priced.

        Raises ContentBlocked (nothing is charged) or InvalidRequest naming the bad value.
        Costs time in proportion to the prompt: ``submit`` and ``quote`` call it off the loop.
        """
        # 0. The length, before anything reads the text (PromptTooLong naming the limit).
        check_text_lengths(request.prompt, request.negative, self.settings.limits)
        # 1. The blocklist, first, so a blocked prompt never reaches the store.
        self.blocklist.check(request.prompt, requester.nsfw_allowed)
        # 2. Styles exist and the styled prompts fit the text encoder (estimated tokens).
        prepare_prompt(request, self.styles, self.blocklist, requester.nsfw_allowed)
        # 3. The model exists; what the person left out is the model's default; the size and
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
        # 3b. LoRAs: the styles' own, then the request's (its weight wins for a name both
        #     give); each must be in the catalogue and fit the model's family. Their trigger
        #     words join the prompt where it lacks them.
        adapters = self._adapters(request, spec.name)
        prompt = add_triggers(request.prompt, adapters, self.models.adapters)
        request = request.model_copy(update={"adapters": adapters, "prompt": prompt})
        # 3c. A ControlNet unit: the ControlNet known and fitting the model's family.
        request = self.models.resolve_control(request.model_copy(update={"model": spec.name}))
        # 4. A concrete model and seed: a retry on another worker, or a rerun, is the same job.
        return request.model_copy(update={"model": spec.name}).with_seed()

    async def _prepared(
        self, request: GenerationRequest, requester: Requester
    ) -> GenerationRequest:
        """``prepare`` with the default model, in a worker thread: the prompt's normalising,
        blocklist and token estimate keep the event loop waiting otherwise."""
        check_text_lengths(request.prompt, request.negative, self.settings.limits)
        request = await self.with_default_model(request)
        return await asyncio.to_thread(self.prepare, request, requester)

    def _adapters(self, request: GenerationRequest, model: str) -> tuple[AdapterRef, ...]:
        given = {ref.name for ref in request.adapters}
        styled = [
            ref for name in request.styles for ref in self.styles.get(name).adapters()
            if ref.name not in given
        ]
        refs = check_adapters((*styled, *request.adapters))
        return self.models.resolve_adapters(refs, model)

    async def submit(
        self,
        request: GenerationRequest,
        requester: Requester,
        delivery: DeliveryTarget,
        idempotency_key: str,
    ) -> SubmittedJob:
        """Accept a job: validate, charge (reserve) and queue it, exactly once per key.

        Raises ContentBlocked, InvalidRequest, ModelUnavailable, AccountBlocked, TooManyJobs (a
        RateLimited) or InsufficientCredits; in every case nothing is charged and no job row is
        left behind.
        """
        # 1. Checks that need no database, then that some worker can load the model.
        request = await self._prepared(request, requester)
        if not idempotency_key or len(idempotency_key) > 200:
            raise InvalidRequest(
                f"idempotency key must be 1 to 200 characters, got {len(idempotency_key)}"
            )
        await self.check_model_available(request.model)

        # 2. The account (created on first contact), not blocked, and its tier's size limit.
        account = await self.account(requester)
        accounts.refuse_blocked(account)
        tier = self.settings.tier(account.tier)
        request.check_limits(self.settings.limits, max_side=tier.max_side)
        cost = job_cost_for(request, self.settings)

        # 3. One transaction: a repeated key returns the job it made; else the tier's
        #    concurrency under the account lock, then the job row and its reservation. An
        #    InsufficientCredits rolls both back: never a charge without a job, or the reverse.
        def create(session: Session) -> tuple[JobRead, bool]:
            existing = job_repo.find_job(session=session, idempotency_key=idempotency_key)
            if existing is not None:
                if existing.account_id != account.id:
                    raise Conflict(
                        f"idempotency key {idempotency_key!r} belongs to another account's job"
                    )
                return existing, False
            # The lock makes count-then-insert atomic on PostgreSQL too (SQLite: BEGIN IMMEDIATE).
            ledger.lock_accounts(session, [account.id])
            _check_concurrency(session, account, tier)
            job, created = job_repo.create_job(
                session=session,
                idempotency_key=idempotency_key,
                account_id=account.id,
                identity_id=account.identity.id if account.identity else None,
                request=request,
                delivery=with_nsfw(delivery, requester.nsfw_allowed),
                cost=cost,
                job_id=new_job_id(),
            )
            if created:
                ledger.reserve(
                    session=session,
                    account_id=account.id,
                    job_id=job.id,
                    amount=cost,
                    now=utcnow(),
                    tiers=self.settings.tiers,
                )
            return job, created

        job, created = await self._db(create)
        if not created:
            log.info("job %s: repeated idempotency key, nothing charged", job.id)
            position = await self._position(job)
            return SubmittedJob(
                job.id, job.status, job.cost, False, position, job.request.images_out
            )

        # 4. Queue it. If the broker is down the job stays queued in the database and the
        #    dispatcher's reconciler enqueues it later (it compares the database with the
        #    broker): the person was charged for a job that will run, or be refunded.
        try:
            await self.broker.jobs.enqueue(job.id, {"account": str(job.account_id)})
        except BrokerUnavailable as exc:
            log.warning("job %s: not enqueued now (%s); the reconciler will", job.id, exc)
        log.info(
            "job %s: accepted for account %d (%d credits, %d images)",
            job.id, job.account_id, cost, request.images_out,
        )
        log.debug("job %s: prompt %r", job.id, request.prompt)
        return SubmittedJob(
            job.id, job.status, cost, True, await self._position(job), request.images_out
        )

    async def quote(
        self, request: GenerationRequest, requester: Requester, idempotency_key: str
    ) -> Quote:
        """Check a request as ``submit`` will and price it, writing nothing: a front end
        refuses before it posts anything. Raises what ``submit`` raises (ContentBlocked,
        InvalidRequest, ModelUnavailable, TooManyJobs, InsufficientCredits); ``submit`` still
        checks again."""
        request = await self._prepared(request, requester)
        await self.check_model_available(request.model)
        now = utcnow()

        def read(session: Session) -> Quote:
            existing = job_repo.find_job(session=session, idempotency_key=idempotency_key)
            if existing is not None:
                return Quote(request, existing.cost, None, existing.id)
            try:
                account: AccountRead | None = accounts.find_account(
                    session=session,
                    platform=requester.platform,
                    platform_user_id=requester.platform_user_id,
                )
            except NotFound:
                account = None  # first contact: submit creates it with the default tier
            if account is not None:
                accounts.refuse_blocked(account)
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
            return Quote(request, cost, available, None)

        return await self._db(read, read_only=True)

    async def live_jobs(self, frontend: str) -> list[JobRead]:
        """Queued and running jobs to be delivered to ``frontend`` (a restarted bot follows
        their progress again)."""
        jobs = await self._db(lambda s: job_repo.unfinished_jobs(session=s), read_only=True)
        return [j for j in jobs if j.delivery.frontend == frontend]

    # Which models can run ------------------------------------------------------------------

    async def _published_models(self) -> frozenset[str] | None:
        """The union of what the live workers can load, as their dispatchers published it;
        None before any has (start-up) or while the broker does not answer."""
        try:
            by_worker = await self.broker.registry.worker_models()
        except BrokerUnavailable:
            return None
        return frozenset().union(*by_worker.values()) if by_worker else None

    async def available_models(self) -> list[str]:
        """The registry's models a job can use now, in registry order: those some worker can
        load, or, before any worker has told, those this machine can load. What front ends
        offer and list (``/help``)."""
        published = await self._published_models()
        if published is not None:
            return [n for n in self.models.names() if n in published]
        return await asyncio.to_thread(loadable_models, self.models)

    async def default_model(self) -> str:
        """The model a request naming none gets: the registry's default, or its fallback (the
        demo model) when no worker can load the default and some can load the fallback."""
        default, fallback = self.models.default, self.models.fallback
        if fallback is None or fallback == default:
            return default
        published = await self._published_models()
        if published is not None:
            return fallback if default not in published and fallback in published else default

        def here(name: str) -> bool:
            return model_availability(self.models.get(name)).loadable

        if await asyncio.to_thread(here, default) or not await asyncio.to_thread(here, fallback):
            return default
        return fallback

    async def with_default_model(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its model named (``default_model`` when it names none)."""
        if request.model is not None:
            return request
        return request.model_copy(update={"model": await self.default_model()})

    async def check_model_available(self, name: str | None) -> None:
        """Raise ModelUnavailable, with one line on how to get it, when no worker can load
        model ``name`` (the default when None); InvalidRequest for an unknown name."""
        spec = self.models.get(name)
        published = await self._published_models()
        if published is not None and spec.name in published:
            return
        here = await asyncio.to_thread(model_availability, spec)
        if published is None:  # no worker has told yet: what this machine has stands for it
            if here.loadable:
                return
            raise ModelUnavailable(
                f"model '{spec.name}' is not available: {here.why}. To get it: {here.how}"
            )
        why = f" ({here.why})" if here.why else ""
        raise ModelUnavailable(
            f"model '{spec.name}' is not available on any worker{why}. "
            f"To get it: {here.how or how_to_get(spec)}"
        )

    async def _position(self, job: JobRead) -> int | None:
        """Queued jobs created up to this one, across all accounts (the store knows them all,
        wherever they wait: in the stream or in a dispatcher's read-ahead window)."""
        if job.status is not JobStatus.queued:
            return None
        return await self._db(lambda s: queue_position(s, job), read_only=True)

    # Cancelling --------------------------------------------------------------------------

    async def cancel(self, job_id: str, requester: Requester) -> JobStatus:
        """Cancel the requester's job. Queued: cancelled and refunded now (returns
        ``cancelled``). Running: the dispatcher is asked to interrupt it and refund (returns
        ``running``; the job's events end with ``cancelled``, or ``done`` if it was too late).
        Raises Forbidden for someone else's job and Conflict once it finished."""

        def mark(session: Session) -> JobStatus:
            job = job_repo.get_job(session=session, job_id=job_id)  # NotFound
            try:
                account = accounts.find_account(
                    session=session,
                    platform=requester.platform,
                    platform_user_id=requester.platform_user_id,
                )
            except NotFound:
                account = None
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
                yield JobEvent(EventKind.queued, job_id, position=await self._position(job))
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

    # Helpers for front ends --------------------------------------------------------------

    def _resolve(self, session: Session, requester: Requester) -> AccountRead:
        return accounts.resolve_account(
            session=session,
            platform=requester.platform,
            platform_user_id=requester.platform_user_id,
            display_name=requester.display_name,
            default_tier=self.settings.default_tier,
        )

    async def account(self, requester: Requester) -> AccountRead:
        """The requester's account, created with the default tier on first contact.

        Looked up first without taking the writer's lock (SQLite has one for the whole file):
        every submit asks, and nearly always the account exists and its name is unchanged."""

        def find(session: Session) -> AccountRead | None:
            try:
                found = accounts.find_account(
                    session=session, platform=requester.platform,
                    platform_user_id=requester.platform_user_id,
                )
            except NotFound:
                return None
            name = requester.display_name[:128] if requester.display_name else None
            if name and (found.identity is None or found.identity.display_name != name):
                return None  # a new display name: the write below records it
            return found

        found = await self._db(find, read_only=True)
        if found is not None:
            return found
        return await self._db(lambda s: self._resolve(s, requester))

    async def balance(self, requester: Requester) -> Balance:
        def read(session: Session) -> Balance:
            account = self._resolve(session, requester)
            return ledger.balance(
                session=session, account_id=account.id, now=utcnow(), tiers=self.settings.tiers
            )

        return await self._db(read)

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

    async def history(self, requester: Requester, limit: int = 5) -> list[JobRead]:
        """The requester's latest jobs, newest first, each with its request."""

        def read(session: Session) -> list[JobRead]:
            account = self._resolve(session, requester)
            return job_repo.list_jobs(session=session, account_id=account.id, limit=limit)

        return await self._db(read)

    async def create_link_code(self, requester: Requester) -> LinkCodeRead:
        """A one-time code the requester types on another platform to join the two accounts."""

        def make(session: Session) -> LinkCodeRead:
            account = self._resolve(session, requester)
            if account.identity is None:
                raise NotFound(f"no identity for {requester.platform}:{requester.platform_user_id}")
            return accounts.create_link_code(
                session=session,
                identity_id=account.identity.id,
                now=utcnow(),
                ttl=timedelta(seconds=self.settings.link_code_ttl_s),
            )

        return await self._db(make)

    async def create_api_key(self, requester: Requester, name: str = "") -> NewApiKey:
        """A new API key acting as the requester (the account is made on first contact); the
        returned ``key`` is the only time it is seen: only its sha256 is stored."""

        def make(session: Session) -> NewApiKey:
            account = self._resolve(session, requester)
            if account.identity is None:
                raise NotFound(f"no identity for {requester.platform}:{requester.platform_user_id}")
            return apikeys.create_api_key(
                session=session, identity_id=account.identity.id, name=name
            )

        return await self._db(make)

    async def redeem_link_code(self, requester: Requester, code: str) -> AccountRead:
        """Join the requester's identity to the account that made ``code``."""

        def redeem(session: Session) -> AccountRead:
            account = self._resolve(session, requester)
            if account.identity is None:
                raise NotFound(f"no identity for {requester.platform}:{requester.platform_user_id}")
            return accounts.redeem_link_code(
                session=session, code=code, identity_id=account.identity.id, now=utcnow()
            )

        return await self._db(redeem)


def _check_concurrency(session: Session, account: AccountRead, tier: Tier) -> None:
    """TooManyJobs when the account already has as many jobs in flight as its tier allows."""
    in_flight = job_repo.running_jobs_count(session=session, account_id=account.id)
    if in_flight >= tier.concurrency:
        raise TooManyJobs(
            f"you already have {in_flight} jobs queued or running; the {account.tier} "
            f"tier allows {tier.concurrency} at a time, so wait for one to finish",
            retry_after=BUSY_RETRY_AFTER_S,
        )


def queue_position(session: Session, job: JobRead) -> int:
    """1 for the oldest queued job. (A candidate for storage.jobs, with an index on
    (status, created_at) once the jobs table grows large.)"""
    ahead = session.exec(
        select(func.count())
        .select_from(Job)
        .where(col(Job.status) == JobStatus.queued, col(Job.created_at) <= job.created_at)
    ).one()
    return max(1, int(ahead))


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
