"""What every web route needs, built once by the process that serves the app (``atelier``):
settings, the SQL session factory (and ``store``, its off-loop runner), the blob store, the
cluster Client and the rate counter. ``web`` never imports ``atelier`` or ``bots``; it receives
this instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from cluster.client import Client
from core.settings import Settings
from storage.blobs import BlobStore
from storage.db import Store
from web.ratelimit import RateCounter


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WebContext:
    """The web app's dependencies. ``now`` is the clock links and cookies are checked
    against (tests move it to expire them)."""

    settings: Settings
    sessions: sessionmaker[Session]
    blobs: BlobStore
    client: Client
    rates: RateCounter | None = None  # None: one beside the client's broker (rate_counter_for)
    now: Callable[[], datetime] = field(default=_utcnow)
    _store: Store | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def store(self) -> Store:
        """``sessions`` as the one off-loop runner (``storage.db.Store``): every route's SQL
        runs through it, each call one transaction on a worker thread."""
        if self._store is None or self._store.sessions is not self.sessions:
            self._store = Store(self.sessions)
        return self._store

    @property
    def signing_key(self) -> bytes:
        return self.settings.resolved_signing_key
