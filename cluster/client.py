"""What a front end holds: the three services it uses, built once over one store and broker.
``jobs`` (cluster/jobs.py: one admission, cancel, follow), ``accounts`` (cluster/accounts.py:
accounts, link codes, API keys) and ``runnable`` (cluster/runnable.py: which models can run).

The methods below them are the old single door, kept as one-line delegations while the tests
and benches that call them move over (issue 22); front ends call the services."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.accounts import Accounts
from cluster.broker import Broker
from cluster.events import ImageRef, JobEvent
from cluster.jobs import DEFAULT_POLL_INTERVAL_S, Jobs, Quote, SubmittedJob, new_job_id
from cluster.registry import ModelRegistry
from cluster.runnable import RunnableModels
from core.jobs import DeliveryTarget, JobStatus, Requester
from core.prompts import Blocklist
from core.request import GenerationRequest
from core.settings import Settings
from core.styles import StyleRegistry
from storage.accounts import AccountRead, LinkCodeRead
from storage.apikeys import NewApiKey
from storage.blobs import BlobStore
from storage.db import Store
from storage.jobs import JobRead
from storage.ledger import Balance

__all__ = ["Client", "Quote", "SubmittedJob", "new_job_id"]


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
        self._settings = settings
        self.sessions = session_factory
        self.broker = broker
        self.blobs = blobs
        self.styles = styles
        # The configured list (atelier/app.py make_client loads ATELIER_BLOCKLIST_FILE, as the
        # workers do): admission's check is the one that counts, the worker uses its prompts.
        self.blocklist = blocklist
        registry = models
        db = Store(session_factory)
        self.runnable = RunnableModels(registry, broker)
        self.accounts = Accounts(settings, db)
        self.jobs = Jobs(
            settings=settings, db=db, broker=broker, blobs=blobs, styles=self.styles,
            blocklist=self.blocklist, models=registry, runnable=self.runnable,
            poll_interval_s=poll_interval_s,
        )
        self.poll_interval_s = poll_interval_s

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings for the client and the services it bundles (tests and tools swap them)."""
        self._settings = settings
        self.jobs.settings = settings
        self.accounts.settings = settings

    @property
    def models(self) -> ModelRegistry:
        return self.jobs.models

    @models.setter
    def models(self, registry: ModelRegistry) -> None:
        """Another registry for every service (a test narrowing what the models support)."""
        self.jobs.models = self.runnable.models = registry

    # The old door: delegations (see the module's docstring) ------------------------------

    def prepare(self, request: GenerationRequest, requester: Requester) -> GenerationRequest:
        return self.jobs.prepare(request, requester).request

    async def quote(
        self, request: GenerationRequest, requester: Requester, idempotency_key: str
    ) -> Quote:
        return await self.jobs.admit(request, requester, idempotency_key)

    async def submit(
        self, request: GenerationRequest, requester: Requester, delivery: DeliveryTarget,
        idempotency_key: str,
    ) -> SubmittedJob:
        """``jobs.admit`` then ``jobs.submit``: the request is prepared once."""
        quote = await self.jobs.admit(request, requester, idempotency_key)
        return await self.jobs.submit(quote, delivery)

    async def available_models(self) -> list[str]:
        return await self.runnable.available()

    async def default_model(self) -> str:
        return await self.runnable.default()

    async def with_default_model(self, request: GenerationRequest) -> GenerationRequest:
        return await self.runnable.with_default(request)

    async def check_model_available(self, name: str | None) -> None:
        await self.runnable.check(name)

    async def live_jobs(self, frontend: str) -> list[JobRead]:
        return await self.jobs.live_jobs(frontend)

    async def cancel(self, job_id: str, requester: Requester) -> JobStatus:
        return await self.jobs.cancel(job_id, requester)

    def events(self, job_id: str) -> AsyncGenerator[JobEvent, None]:
        return self.jobs.events(job_id)

    async def wait(self, job_id: str) -> JobEvent:
        return await self.jobs.wait(job_id)

    async def job(self, job_id: str) -> JobRead:
        return await self.jobs.job(job_id)

    async def mark_delivered(self, job_id: str) -> bool:
        return await self.jobs.mark_delivered(job_id)

    async def job_images(self, job_id: str) -> list[ImageRef]:
        return await self.jobs.job_images(job_id)

    async def image_bytes(self, image: ImageRef) -> bytes:
        return await self.jobs.image_bytes(image)

    async def account(self, requester: Requester) -> AccountRead:
        return await self.accounts.account(requester)

    async def balance(self, requester: Requester) -> Balance:
        return await self.accounts.balance(requester)

    async def history(self, requester: Requester, limit: int = 5) -> list[JobRead]:
        return await self.accounts.history(requester, limit)

    async def create_link_code(self, requester: Requester) -> LinkCodeRead:
        return await self.accounts.create_link_code(requester)

    async def redeem_link_code(self, requester: Requester, code: str) -> AccountRead:
        return await self.accounts.redeem_link_code(requester, code)

    async def create_api_key(self, requester: Requester, name: str = "") -> NewApiKey:
        return await self.accounts.create_api_key(requester, name)
