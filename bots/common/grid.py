"""The X/Y/Z grid in a chat, for every platform: ``/grid a lighthouse --x cfg=3,7,11 --y
steps=10,20``. Checked and priced (the sum of its cells) before anything is posted; every cell
is an ordinary job behind one status message; when the last cell's delivery arrives the
labelled contact sheet is posted once (the cells are in the gallery, each with its infotext).
Until then a Cancel grid button under the status cancels the cells not done, refunding them."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from bots.common import keyboards, texts
from bots.common.core import ChatCore
from bots.common.jobs import gallery_text, refuse, show_status
from bots.common.port import Destination, Picture, Who
from bots.common.posting import Posted, post_result
from bots.common.requests import parse_prompt
from cluster.events import EventKind, JobEvent
from cluster.grid import (
    GridQuote,
    SubmittedGrid,
    cancel_grid,
    grid_job_ids,
    quote_grid,
    sheet_png,
    submit_grid,
)
from core.errors import AtelierError, InvalidRequest
from core.flags import CONTROL_NEEDS_PICTURE
from core.grid import Axis, describe_axes, expand, ordered_axes, split_axes
from core.jobs import DeliveryTarget, JobStatus, Requester

log = logging.getLogger(__name__)

# DeliveryTarget.extra keys a grid cell's job carries (strings, as every extra).
GRID = "grid"  # the grid's idempotency key: finds every cell's job
CELLS = "cells"
AXES = "axes"  # the --x/--y/--z values (JSON): the sheet's labels, rebuilt at delivery

# One sheet at a time per grid in this process: two cells finishing together both see the
# grid complete; the second then finds the sheet posted (``Posted``) and says nothing.
_sheet_locks: dict[str, asyncio.Lock] = {}


@dataclass(frozen=True, slots=True)
class CheckedGrid:
    """A grid checked and priced for its asker, not yet submitted."""

    quote: GridQuote
    requester: Requester
    axes_text: dict[str, str]
    idempotency_key: str


async def check(core: ChatCore, who: Who, text: str, *, idempotency_key: str) -> CheckedGrid:
    """Everything a grid can be refused for, before anything is posted; raises the refusal."""
    if not text.strip():
        raise InvalidRequest(texts.GRID_USAGE)
    requester = await core.requester(who)
    rest, given = split_axes(text)
    axes = ordered_axes(given, core.styles)
    prefs = await core.prefs.user(who.user_id)
    parsed = await asyncio.to_thread(parse_prompt, rest, prefs, core.styles, core.settings.limits)
    if parsed.control is not None:
        raise InvalidRequest(f"{CONTROL_NEEDS_PICTURE}; /grid takes none, /imagine does")
    grid = expand(parsed.request, axes, max_cells=core.settings.grid.max_cells)
    quote = await quote_grid(core.client, grid, requester)
    return CheckedGrid(quote, requester, given, idempotency_key)


async def grid(
    core: ChatCore, who: Who, text: str, *, idempotency_key: str
) -> SubmittedGrid | None:
    """Make an X/Y/Z grid; a refusal is one line, never a status first."""
    try:
        checked = await check(core, who, text, idempotency_key=idempotency_key)
        return await start_checked(core, who, checked)
    except AtelierError as exc:
        await refuse(core, who, exc)
        return None


async def start_checked(core: ChatCore, who: Who, checked: CheckedGrid) -> SubmittedGrid | None:
    """Post the grid's status message and submit its cells behind it."""
    quote, chat = checked.quote, who.chat_id
    prompt, shape = quote.grid.base.prompt, quote.grid.describe()
    cells = len(quote.requests)
    status = await core.port.send(
        chat, texts.grid_queued(prompt, shape, cells, quote.cost), reply_to=who.message_id,
        via=who.via,
    )
    extra = {
        "owner": checked.requester.platform_user_id,
        GRID: checked.idempotency_key,
        CELLS: str(cells),
        AXES: json.dumps(checked.axes_text),
    }

    def delivery(n: int) -> DeliveryTarget:
        return DeliveryTarget(
            frontend=core.platform, chat_id=chat, message_id=status, extra={**extra, "cell": str(n)}
        )

    try:
        submitted = await submit_grid(
            core.client, quote, checked.requester, delivery, checked.idempotency_key
        )
    except AtelierError:
        if status is not None:
            await core.port.delete(chat, status)
        raise
    if not submitted.created:
        if status is not None:
            await core.port.delete(chat, status)
        return None
    if status is not None:  # the cells are in: they may be cancelled together from now on
        show_status(core, chat, status, texts.grid_queued(prompt, shape, cells, quote.cost),
                    keyboards.cancel_grid(submitted.job_ids[0], checked.requester.platform_user_id))
    return submitted


async def cancel(core: ChatCore, who: Who, first_cell: str, status: str | None) -> str:
    """Cancel the cells of the grid whose first cell is ``first_cell`` that have not ended
    (the Cancel grid button on the ``status`` message); what happened, in one line.
    Forbidden for someone else's grid."""
    first = await core.client.job(first_cell)
    extra = first.delivery.extra
    key, cells = extra.get(GRID), int(extra.get(CELLS, "0") or 0)
    if not key or not cells:
        raise InvalidRequest("that job is not a grid's cell")
    ids = await grid_job_ids(core.client, key, cells)
    done = await cancel_grid(core.client, ids, core.plain_requester(who.user_id))
    if status is not None and not done.stopping and not done.finished:
        # Every cell cancelled before it started: say so now, whatever the deliveries do.
        shape = describe_axes(_axes(core, extra.get(AXES, "{}")))
        credits = await core.credits_left(who.user_id)
        show_status(core, who.chat_id, status,
                    texts.grid_cancelled(first.request.prompt, shape, cells, credits), None,
                    final=True, via=who.via)
    return texts.grid_cancel_asked(done.cancelled, done.stopping, done.finished)


def is_grid_cell(target: DeliveryTarget | None) -> bool:
    return target is not None and bool(target.extra.get(GRID))


async def deliver_cell(core: ChatCore, event: JobEvent) -> None:
    """A grid cell ended (the delivery loop's handler for grid jobs): show how many are done;
    once all are, post the contact sheet (once) and the final status."""
    target = event.delivery
    assert target is not None and target.chat_id  # checked by jobs.deliver
    key, cells = target.extra[GRID], int(target.extra.get(CELLS, "0") or 0)
    axes = _axes(core, target.extra.get(AXES, "{}"))
    shape = describe_axes(axes)
    ids = await grid_job_ids(core.client, key, cells)
    jobs = [await core.client.job(i) for i in ids]
    statuses = [j.status for j in jobs]
    prompt = jobs[0].request.prompt  # the first cell's: a prompt S/R axis changes the others
    done = sum(1 for s in statuses if s.finished)
    owner = target.extra.get("owner", "")
    if done < cells:
        if target.message_id and event.kind is EventKind.done:
            show_status(core, target.chat_id, target.message_id,
                        texts.grid_progress(prompt, shape, done, cells),
                        keyboards.cancel_grid(ids[0], owner))
        return
    if all(s is JobStatus.cancelled for s in statuses):  # nothing to draw a sheet of
        if target.message_id:
            credits = await core.credits_left(owner) if owner else None
            show_status(core, target.chat_id, target.message_id,
                        texts.grid_cancelled(prompt, shape, cells, credits), None, final=True)
        return
    lock = _sheet_locks.setdefault(key, asyncio.Lock())
    async with lock:
        # Recorded as the first cell's result (a cell posts nothing of its own; the port reads
        # that job's delivery for the owner and the status message). A lone picture's part is
        # "1": a sheet already out is not drawn again.
        posted = Posted(core.state, core.platform, ids[0], here=core.posted_here)
        if not await posted.has("1"):
            png = await sheet_png(core.client, axes, ids)
            caption = texts.prompt_preview(f"{prompt} ({shape})", 900)
            to = Destination(target.chat_id, owner, target.message_id or None,
                             gallery_text(core, owner))
            await post_result(
                core.port, to,
                [Picture(png, f"atelier-grid-{ids[0][:8]}.png", caption)],
                keyboards.grid_sheet(owner),
                as_files=len(png) > core.port.photo_max_bytes,
                posted=posted,
            )
        missing = sum(1 for s in statuses if s is not JobStatus.succeeded)
        if target.message_id:
            show_status(core, target.chat_id, target.message_id,
                        texts.grid_finished(prompt, shape, cells, missing), None, final=True)
    _sheet_locks.pop(key, None)


def _axes(core: ChatCore, text: str) -> tuple[Axis, ...]:
    """The axes a cell's delivery carries (as ``check`` accepted them)."""
    given = json.loads(text)
    return ordered_axes({str(k): str(v) for k, v in given.items()}, core.styles)
