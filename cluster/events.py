"""What front ends hear about a job: ``JobEvent`` (queued, started, progress, done, failed,
cancelled) and the ``ImageRef`` of each finished image, as flat str -> str stream fields."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core.errors import Conflict, InvalidRequest
from core.jobs import DeliveryTarget, JobStatus

if TYPE_CHECKING:
    from storage.gallery import ImageRead
    from storage.jobs import JobRead

# Bumped when a field changes meaning; readers ignore fields they do not know.
EVENT_VERSION = "1"
# Where a job row remembers that its requester was in a channel marked NSFW (the worker's
# blocklist check needs it on every attempt, also after a reconcile re-enqueued the job).
NSFW_EXTRA_KEY = "atelier_nsfw"


class EventKind(StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (EventKind.done, EventKind.failed, EventKind.cancelled)


# The terminal event each finished job status is announced with.
TERMINAL_KIND: dict[JobStatus, EventKind] = {
    JobStatus.succeeded: EventKind.done,
    JobStatus.failed: EventKind.failed,
    JobStatus.cancelled: EventKind.cancelled,
}


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One stored image of a job: its gallery row id and the blob holding the PNG."""

    image_id: int
    index: int
    seed: int
    style: str | None
    width: int
    height: int
    blob_key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "index": self.index,
            "seed": self.seed,
            "style": self.style,
            "width": self.width,
            "height": self.height,
            "blob_key": self.blob_key,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageRef:
        try:
            return cls(
                image_id=int(data["image_id"]),
                index=int(data["index"]),
                seed=int(data["seed"]),
                style=None if data.get("style") is None else str(data["style"]),
                width=int(data["width"]),
                height=int(data["height"]),
                blob_key=str(data["blob_key"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"not an image reference: {dict(data)!r} ({exc})") from None


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One thing that happened to a job. Exactly one terminal event (done, failed or
    cancelled) ends a job's story; ``delivery`` rides along on the front end's stream."""

    kind: EventKind
    job_id: str
    position: int | None = None  # queued: jobs waiting, this one included (best effort)
    step: int | None = None  # progress: steps done of ``total``, over the whole batch
    total: int | None = None
    images: tuple[ImageRef, ...] = ()  # done
    reason: str | None = None  # failed / cancelled: one line fit to show the person
    delivery: DeliveryTarget | None = field(default=None, compare=False)

    @property
    def terminal(self) -> bool:
        return self.kind.terminal

    def to_fields(self) -> dict[str, str]:
        """Flat str -> str fields for a Redis stream entry or a progress message."""
        out = {"v": EVENT_VERSION, "kind": self.kind.value, "job_id": self.job_id}
        for name in ("position", "step", "total"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        if self.images:
            out["images"] = json.dumps([i.to_json() for i in self.images], separators=(",", ":"))
        if self.reason is not None:
            out["reason"] = self.reason
        if self.delivery is not None:
            out["delivery"] = self.delivery.model_dump_json()
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> JobEvent:
        """Parse ``to_fields()`` output; InvalidRequest naming the bad field otherwise."""
        try:
            kind = EventKind(str(fields["kind"]))
            job_id = str(fields["job_id"])
        except (KeyError, ValueError):
            raise InvalidRequest(f"not a job event: {dict(fields)!r}") from None
        numbers: dict[str, int | None] = {}
        for name in ("position", "step", "total"):
            raw = fields.get(name)
            try:
                numbers[name] = None if raw is None or raw == "" else int(raw)
            except (TypeError, ValueError):
                raise InvalidRequest(
                    f"job event field {name} must be an integer, got {raw!r}"
                ) from None
        images: tuple[ImageRef, ...] = ()
        if fields.get("images"):
            try:
                raw_images = json.loads(str(fields["images"]))
            except ValueError:
                raise InvalidRequest(
                    f"job event field images is not JSON: {str(fields['images'])[:80]!r}"
                ) from None
            if not isinstance(raw_images, list):
                raise InvalidRequest("job event field images must be a JSON list")
            images = tuple(ImageRef.from_json(i) for i in raw_images)
        delivery = None
        if fields.get("delivery"):
            try:
                delivery = DeliveryTarget.model_validate_json(str(fields["delivery"]))
            except ValueError:
                raise InvalidRequest("job event field delivery is not a delivery target") from None
        reason = fields.get("reason")
        return cls(
            kind=kind,
            job_id=job_id,
            position=numbers["position"],
            step=numbers["step"],
            total=numbers["total"],
            images=images,
            reason=None if reason is None else str(reason),
            delivery=delivery,
        )


# Built from the store's read shapes ------------------------------------------------------------


def image_ref(image: ImageRead) -> ImageRef:
    return ImageRef(
        image_id=image.id,
        index=image.index,
        seed=image.seed,
        style=image.styles[0] if image.styles else None,
        width=image.width,
        height=image.height,
        blob_key=image.blob_key,
    )


def terminal_event(job: JobRead, images: list[ImageRead]) -> JobEvent:
    """The terminal event of a finished job, from its row (the record of truth)."""
    kind = TERMINAL_KIND.get(job.status)
    if kind is None:
        raise Conflict(f"job {job.id} is {job.status.value}, not finished")
    reason = None
    if kind is EventKind.failed:
        reason = job.error or "the job failed"
    elif kind is EventKind.cancelled:
        reason = job.error or "cancelled"
    return JobEvent(
        kind=kind,
        job_id=job.id,
        images=tuple(image_ref(i) for i in images) if kind is EventKind.done else (),
        reason=reason,
        delivery=job.delivery,
    )


def nsfw_allowed(delivery: DeliveryTarget) -> bool:
    return delivery.extra.get(NSFW_EXTRA_KEY) == "1"


def with_nsfw(delivery: DeliveryTarget, allowed: bool) -> DeliveryTarget:
    """The delivery target carrying the channel's NSFW flag (only set when allowed)."""
    extra = {k: v for k, v in delivery.extra.items() if k != NSFW_EXTRA_KEY}
    if allowed:
        extra[NSFW_EXTRA_KEY] = "1"
    return delivery.model_copy(update={"extra": extra})
