"""Helpers shared by the cluster tests that drive the whole stack (test_pipeline, test_faults):
the stack a test drives, requests and requesters, and ledger checks."""

from __future__ import annotations

import asyncio
import io
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import func
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, select

from cluster.broker import Broker
from cluster.client import Client, SubmittedJob
from cluster.dispatcher import Dispatcher
from cluster.events import JobEvent
from core.jobs import DeliveryTarget, Requester
from core.request import GenerationRequest
from core.settings import Settings
from storage import ledger
from storage.blobs import BlobStore
from storage.db import transaction
from storage.models import CreditKind, CreditLedger
from tests.conftest import RedisServer

PG_ADMIN_URL = os.environ.get("ATELIER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SIZE = 64
STEPS = 2


@dataclass
class Cluster:
    """Everything a test drives: the client, and a dispatcher it starts when it wants."""

    settings: Settings
    sessions: sessionmaker[Session]
    broker: Broker
    blobs: BlobStore
    client: Client
    dispatcher: Dispatcher
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.dispatcher.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)

    def session(self) -> Any:
        return transaction(self.sessions)

    async def deliveries(self, frontend: str) -> list[JobEvent]:
        entries = await self.broker.deliveries.read_deliveries(
            frontend, "tests", count=1000, block_ms=0
        )
        return [JobEvent.from_fields(e.event) for e in entries]

    async def wait_all(self, job_ids: list[str], timeout: float = 60) -> dict[str, JobEvent]:
        async def one(job_id: str) -> tuple[str, JobEvent]:
            return job_id, await self.client.wait(job_id)

        done = await asyncio.wait_for(asyncio.gather(*(one(j) for j in job_ids)), timeout)
        return dict(done)


# Helpers -----------------------------------------------------------------------------------------


def who(name: str, platform: str = "telegram", nsfw: bool = False) -> Requester:
    return Requester(platform=platform, platform_user_id=name, display_name=name,
                     nsfw_allowed=nsfw)


def where(frontend: str = "telegram", chat: str = "100") -> DeliveryTarget:
    return DeliveryTarget(frontend=frontend, chat_id=chat, message_id=uuid.uuid4().hex[:8])


def req(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "prompt": "a lighthouse at dusk", "model": "tiny", "width": SIZE, "height": SIZE,
        "steps": STEPS, "scheduler": "Euler",
    }
    return GenerationRequest(**(base | fields))


def png(size: int = SIZE, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mask(size: int = SIZE) -> bytes:
    m = np.zeros((size, size), dtype=np.uint8)
    m[:, size // 2 :] = 255
    buf = io.BytesIO()
    Image.fromarray(m, mode="L").save(buf, "PNG")
    return buf.getvalue()


async def submit(c: Cluster, requester: Requester, request: GenerationRequest,
                 frontend: str = "telegram", key: str | None = None) -> SubmittedJob:
    return await c.client.submit(request, requester, where(frontend), key or uuid.uuid4().hex)


def audit(c: Cluster, requester: Requester) -> ledger.Audit:
    with c.session() as s:
        account = job_repo_account(s, requester)
        return ledger.audit(session=s, account_id=account)


def job_repo_account(s: Session, requester: Requester) -> int:
    from storage.accounts import find_account

    return find_account(
        session=s, platform=requester.platform, platform_user_id=requester.platform_user_id
    ).id


def ledger_rows(c: Cluster, job_id: str, kind: CreditKind) -> int:
    """How many ledger rows of ``kind`` one job has."""
    with c.session() as s:
        return int(s.exec(
            select(func.count()).select_from(CreditLedger).where(
                CreditLedger.job_id == job_id, CreditLedger.kind == kind
            )
        ).one())


def captures(c: Cluster, job_id: str) -> int:
    return ledger_rows(c, job_id, CreditKind.capture)


def kill_redis(server: RedisServer) -> None:
    """SIGKILL: no shutdown save, no goodbye to clients."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(timeout=10)
    server.proc = None
