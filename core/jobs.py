"""Job lifecycle vocabulary shared by the store, the cluster and the front ends."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

# The error a job cancelled by the person who asked for it is left with.
CANCELLED_BY_OWNER = "cancelled by its owner"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Requester(BaseModel):
    """Who asked: a platform identity and the context of the channel they asked in."""

    model_config = ConfigDict(frozen=True)

    platform: str  # "telegram" | "discord" | "web" | "cli"
    platform_user_id: str
    display_name: str | None = None
    nsfw_allowed: bool = False


class DeliveryTarget(BaseModel):
    """Where the finished images go: the front end's stream plus its own addressing."""

    model_config = ConfigDict(frozen=True)

    frontend: str  # names the delivery stream: atelier:deliveries:{frontend}
    chat_id: str | None = None
    message_id: str | None = None
    extra: dict[str, str] = {}
