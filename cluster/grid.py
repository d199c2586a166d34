"""Running an X/Y/Z grid: price it as the sum of its cells (refused above the settings' caps),
submit every cell as an ordinary job in one transaction (one charge, each cell its own gallery
image and infotext; cells with equal batch keys share pipeline calls in the dispatcher), cancel
the cells not done together (each through the ordinary cancel path, which refunds it), and draw
the contact sheet once the cells are done."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from sqlmodel import Session

from cluster.client import Client
from cluster.events import with_nsfw
from cluster.jobs import BUSY_RETRY_AFTER_S, new_job_id
from core.cost import job_cost_for
from core.errors import Conflict, InsufficientCredits, InvalidRequest, NotFound, TooManyJobs
from core.grid import Axis, Grid, axes_labels, axes_shape, grid_infotext
from core.gridsheet import contact_sheet
from core.images import decode_png_rgb
from core.infotext import read_png_infotext
from core.jobs import DeliveryTarget, JobStatus, Requester
from core.offload import run_heavy
from core.request import GenerationRequest
from storage import accounts, ledger
from storage import jobs as job_repo
from storage.accounts import AccountRead
from storage.db import Store
from storage.models import utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GridQuote:
    """A grid checked and priced: each cell's prepared request (what runs), and the total."""

    grid: Grid
    requests: tuple[GenerationRequest, ...]
    cost: int
    credits: int | None  # what the person can spend now (None when the account is new)


@dataclass(frozen=True, slots=True)
class SubmittedGrid:
    """What ``submit_grid`` made: the cells' job ids in the grid's order and the total charge.
    ``created`` is False for a repeated idempotency key (nothing charged again)."""

    job_ids: tuple[str, ...]
    cost: int
    created: bool


def cell_key(idempotency_key: str, index: int) -> str:
    """The idempotency key of a grid's ``index``-th cell."""
    return f"{idempotency_key}#{index}"


async def quote_grid(client: Client, grid: Grid, requester: Requester) -> GridQuote:
    """Check every cell as ``Client.quote`` checks a job, and price the grid as the sum of its
    cells; InvalidRequest past ``settings.grid`` caps, InsufficientCredits past the balance.
    Writes nothing."""
    caps = client.settings.grid
    if len(grid.cells) > caps.max_cells:
        raise InvalidRequest(
            f"this grid has {len(grid.cells)} cells; a grid may have at most {caps.max_cells}"
        )
    prepared: list[GenerationRequest] = []
    for cell in grid.cells:
        request = await client.with_default_model(cell.request)
        try:
            prepared.append(await asyncio.to_thread(client.prepare, request, requester))
        except InvalidRequest as exc:
            raise InvalidRequest(f"cell {', '.join(cell.labels)}: {exc.message}") from None
    for model in dict.fromkeys(r.model for r in prepared):
        await client.check_model_available(model)
    # Every cell keeps the seed expand() fixed: prepare() only draws one for a cell without.
    account = await client.account(requester)
    accounts.refuse_blocked(account)  # AccountBlocked: nothing charged
    tier = client.settings.tier(account.tier)
    for request in prepared:
        request.check_limits(client.settings.limits, max_side=tier.max_side)
    cost = sum(job_cost_for(r, client.settings) for r in prepared)
    if cost > caps.max_credits:
        raise InvalidRequest(
            f"this grid costs {cost} credits ({len(prepared)} cells); a grid may cost at most "
            f"{caps.max_credits}: use fewer values, fewer steps or a smaller size"
        )
    balance = await client.balance(requester)
    if balance.total < cost:
        raise InsufficientCredits(
            f"this grid needs {cost} credits; you have {balance.total}",
            needed=cost, available=balance.total,
        )
    return GridQuote(grid, tuple(prepared), cost, balance.total)


async def submit_grid(
    client: Client,
    quote: GridQuote,
    requester: Requester,
    delivery: Callable[[int], DeliveryTarget],
    idempotency_key: str,
) -> SubmittedGrid:
    """Create and charge every cell's job in one transaction, then queue them. The grid counts
    as one submission against the tier's jobs-at-a-time (its cells all run). A repeated key
    returns the jobs it made. Raises TooManyJobs or InsufficientCredits with nothing charged."""
    if not idempotency_key or len(idempotency_key) > 180:
        raise InvalidRequest(
            f"idempotency key must be 1 to 180 characters, got {len(idempotency_key)}"
        )
    account = await client.account(requester)
    tier = client.settings.tier(account.tier)
    costs = [job_cost_for(r, client.settings) for r in quote.requests]
    db = Store(client.sessions)

    def create(session: Session) -> tuple[list[str], bool]:
        first = job_repo.find_job(session=session, idempotency_key=cell_key(idempotency_key, 0))
        if first is not None:
            if first.account_id != account.id:
                raise Conflict(
                    f"idempotency key {idempotency_key!r} belongs to another account's grid"
                )
            ids = []
            for n in range(len(quote.requests)):
                job = job_repo.find_job(session=session,
                                        idempotency_key=cell_key(idempotency_key, n))
                if job is None:
                    raise NotFound(f"grid {idempotency_key!r} has no cell {n}")
                ids.append(job.id)
            return ids, False
        ledger.lock_accounts(session, [account.id])
        _check_slots(session, account, tier.concurrency)
        ids = []
        for n, (request, cost) in enumerate(zip(quote.requests, costs, strict=True)):
            job, _ = job_repo.create_job(
                session=session, idempotency_key=cell_key(idempotency_key, n),
                account_id=account.id,
                identity_id=account.identity.id if account.identity else None,
                request=request, delivery=_with_nsfw(delivery(n), requester), cost=cost,
                job_id=new_job_id(),
            )
            ledger.reserve(session=session, account_id=account.id, job_id=job.id, amount=cost,
                           now=utcnow(), tiers=client.settings.tiers)
            ids.append(job.id)
        return ids, True

    ids, created = await db(create)
    if created:
        for job_id in ids:
            try:
                await client.broker.jobs.enqueue(job_id, {"account": str(account.id)})
            except Exception as exc:  # BrokerUnavailable: the reconciler enqueues it later
                log.warning("grid cell %s: not enqueued now (%s); the reconciler will", job_id, exc)
        log.info("grid %s: %d cells accepted for account %d (%d credits)",
                 idempotency_key, len(ids), account.id, sum(costs))
    return SubmittedGrid(tuple(ids), sum(costs), created)


def _with_nsfw(delivery: DeliveryTarget, requester: Requester) -> DeliveryTarget:
    return with_nsfw(delivery, requester.nsfw_allowed)


def _check_slots(session: Session, account: AccountRead, concurrency: int) -> None:
    in_flight = job_repo.running_jobs_count(session=session, account_id=account.id)
    if in_flight >= concurrency:
        raise TooManyJobs(
            f"you already have {in_flight} jobs queued or running; the {account.tier} tier "
            f"allows {concurrency} at a time, so wait for one to finish",
            retry_after=BUSY_RETRY_AFTER_S,
        )


@dataclass(frozen=True, slots=True)
class CancelledGrid:
    """What ``cancel_grid`` did to a grid's cells."""

    cancelled: int  # queued: cancelled now, their credits released
    stopping: int  # running: asked to stop (released when they do; some may finish first)
    finished: int  # ended before the cancel (their images stay, their credits spent)


async def cancel_grid(client: Client, job_ids: tuple[str, ...], requester: Requester
                      ) -> CancelledGrid:
    """Cancel every cell of a grid that has not ended, each through the ordinary cancel path
    (a queued cell is cancelled and refunded at once, a running one interrupted by its
    dispatcher and refunded then). Forbidden, before any is touched, when the grid is not
    ``requester``'s."""
    counts = {JobStatus.cancelled: 0, JobStatus.running: 0}
    finished = 0
    for job_id in job_ids:  # one owner for all: someone else's grid fails at the first cell
        try:
            counts[await client.jobs.cancel(job_id, requester)] += 1
        except Conflict:  # this cell ended already
            finished += 1
    return CancelledGrid(counts[JobStatus.cancelled], counts[JobStatus.running], finished)


async def cell_jobs_finished(client: Client, job_ids: tuple[str, ...]) -> bool:
    """Whether every cell's job has ended (succeeded, failed or cancelled)."""
    for job_id in job_ids:
        if not (await client.job(job_id)).status.finished:
            return False
    return True


async def grid_job_ids(client: Client, idempotency_key: str, cells: int) -> tuple[str, ...]:
    """The cells' job ids of the grid submitted under ``idempotency_key``."""
    db = Store(client.sessions)

    def read(session: Session) -> tuple[str, ...]:
        ids = []
        for n in range(cells):
            job = job_repo.find_job(session=session, idempotency_key=cell_key(idempotency_key, n))
            if job is None:
                raise NotFound(f"grid {idempotency_key!r} has no cell {n}")
            ids.append(job.id)
        return tuple(ids)

    return await db(read, read_only=True)


async def sheet_png(client: Client, axes: tuple[Axis, ...], job_ids: tuple[str, ...]) -> bytes:
    """The contact sheet of finished cells (a grey box for a cell without an image), with the
    first cell's infotext and the axes (A1111's ``Script: X/Y/Z plot, X Type: ...``)."""
    images: list[Image.Image | None] = []
    infotext = None
    for job_id in job_ids:
        job = await client.job(job_id)
        refs = await client.job_images(job_id) if job.status is JobStatus.succeeded else []
        if not refs:
            images.append(None)
            continue
        png = await client.image_bytes(sorted(refs, key=lambda r: r.index)[0])
        images.append(await run_heavy(decode_png_rgb, png))
        if infotext is None:
            infotext = read_png_infotext(png)
    text = f"{infotext}, {grid_infotext(axes)}" if infotext else grid_infotext(axes)
    png, _ = await run_heavy(
        contact_sheet, images, axes_shape(axes), axes_labels(axes), infotext=text
    )
    return png

