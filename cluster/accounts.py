"""People's accounts as front ends see them: the account behind a requester (made on first
contact), its balance and latest jobs, link codes that join two platforms' identities, and API
keys. Each call is one transaction of the store, off the event loop."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from core.errors import NotFound
from core.jobs import Requester
from core.settings import Settings
from storage import accounts, apikeys, ledger
from storage import jobs as job_repo
from storage.accounts import AccountRead, LinkCodeRead
from storage.apikeys import NewApiKey
from storage.db import Store
from storage.jobs import JobRead
from storage.ledger import Balance
from storage.models import utcnow


def resolve(session: Session, requester: Requester, settings: Settings) -> AccountRead:
    """The requester's account in ``session``, created with the default tier on first contact
    (and its display name recorded when it changed)."""
    return accounts.resolve_account(
        session=session,
        platform=requester.platform,
        platform_user_id=requester.platform_user_id,
        display_name=requester.display_name,
        default_tier=settings.default_tier,
    )


def find(session: Session, requester: Requester) -> AccountRead | None:
    """The requester's account, or None on first contact (nothing is written)."""
    try:
        return accounts.find_account(
            session=session, platform=requester.platform,
            platform_user_id=requester.platform_user_id,
        )
    except NotFound:
        return None


class Accounts:
    """Accounts, link codes and API keys for front ends. Safe to call from any task."""

    def __init__(self, settings: Settings, db: Store) -> None:
        self.settings = settings
        self._db = db

    def _resolve(self, session: Session, requester: Requester) -> AccountRead:
        return resolve(session, requester, self.settings)

    async def account(self, requester: Requester) -> AccountRead:
        """The requester's account, created with the default tier on first contact.

        Looked up first without taking the writer's lock (SQLite has one for the whole file):
        nearly always the account exists and its name is unchanged."""

        def lookup(session: Session) -> AccountRead | None:
            found = find(session, requester)
            name = requester.display_name[:128] if requester.display_name else None
            if found is None or (
                name and (found.identity is None or found.identity.display_name != name)
            ):
                return None  # first contact or a new display name: the write below records it
            return found

        found = await self._db(lookup, read_only=True)
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

    async def history(self, requester: Requester, limit: int = 5) -> list[JobRead]:
        """The requester's latest jobs, newest first, each with its request."""

        def read(session: Session) -> list[JobRead]:
            account = self._resolve(session, requester)
            return job_repo.list_jobs(session=session, account_id=account.id, limit=limit)

        return await self._db(read)

    def _identity_id(self, account: AccountRead, requester: Requester) -> int:
        if account.identity is None:
            raise NotFound(f"no identity for {requester.platform}:{requester.platform_user_id}")
        return account.identity.id

    async def create_link_code(self, requester: Requester) -> LinkCodeRead:
        """A one-time code the requester types on another platform to join the two accounts."""

        def make(session: Session) -> LinkCodeRead:
            account = self._resolve(session, requester)
            return accounts.create_link_code(
                session=session,
                identity_id=self._identity_id(account, requester),
                now=utcnow(),
                ttl=timedelta(seconds=self.settings.link_code_ttl_s),
            )

        return await self._db(make)

    async def redeem_link_code(self, requester: Requester, code: str) -> AccountRead:
        """Join the requester's identity to the account that made ``code``."""

        def redeem(session: Session) -> AccountRead:
            account = self._resolve(session, requester)
            return accounts.redeem_link_code(
                session=session, code=code, identity_id=self._identity_id(account, requester),
                now=utcnow(),
            )

        return await self._db(redeem)

    async def create_api_key(self, requester: Requester, name: str = "") -> NewApiKey:
        """A new API key acting as the requester (the account is made on first contact); the
        returned ``key`` is the only time it is seen: only its sha256 is stored."""

        def make(session: Session) -> NewApiKey:
            account = self._resolve(session, requester)
            return apikeys.create_api_key(
                session=session, identity_id=self._identity_id(account, requester), name=name
            )

        return await self._db(make)
