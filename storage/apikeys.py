"""API keys for the REST and A1111 APIs: made for an identity, shown once, stored as a sha256,
checked in constant time, listed per account, revoked, stamped with when they were last used."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from core.errors import InvalidRequest, NotFound, Unauthorized
from storage.models import ApiKey, Identity, utcnow

KEY_PREFIX = "atk_"
# atk_<8 hex: the public prefix>_<43 url-safe characters: 256 random bits>
_KEY_RE = re.compile(r"^(atk_[0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_PREFIX_RE = re.compile(r"^atk_[0-9a-f]{8}$")
# last_used_at is written at most this often per key, so that checking a key is a read.
TOUCH_EVERY = timedelta(seconds=60)


class ApiKeyRead(BaseModel):
    """A key as listings show it: never the key itself, nor its hash."""

    id: int
    prefix: str
    name: str
    identity_id: int
    platform: str
    platform_user_id: str
    account_id: int  # the identity's account now (it follows links)
    model: str | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class NewApiKey(BaseModel):
    """What ``create_api_key`` returns: ``key`` is the only time the secret is seen."""

    key: str
    info: ApiKeyRead


def hash_key(key: str) -> str:
    # A plain sha256 is enough: the key carries 256 random bits, nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    *, session: Session, identity_id: int, name: str = "", now: datetime | None = None
) -> NewApiKey:
    """A new key acting as ``identity_id``; the returned ``key`` is not stored anywhere."""
    name = name.strip()
    if len(name) > 64:
        raise InvalidRequest(f"key name must be at most 64 characters, got {len(name)}")
    identity = session.get(Identity, identity_id)
    if identity is None:
        raise NotFound(f"identity {identity_id} does not exist")
    while True:
        prefix = KEY_PREFIX + secrets.token_hex(4)
        if session.exec(select(ApiKey.id).where(ApiKey.prefix == prefix)).first() is None:
            break
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        prefix=prefix,
        key_hash=hash_key(key),
        identity_id=identity_id,
        name=name,
        created_at=now or utcnow(),
    )
    session.add(row)
    session.flush()
    return NewApiKey(key=key, info=_read(row, identity))


def verify_api_key(*, session: Session, key: str) -> ApiKeyRead:
    """The live key ``key`` is; Unauthorized (never echoing the secret) otherwise."""
    match = _KEY_RE.match(key.strip())
    if match is None:
        raise Unauthorized("malformed API key: expected atk_XXXXXXXX_ followed by 43 characters")
    prefix = match.group(1)
    found = session.exec(
        select(ApiKey, Identity)
        .join(Identity, col(Identity.id) == col(ApiKey.identity_id))
        .where(ApiKey.prefix == prefix)
    ).first()
    # Compared even when no row matched, so the time taken does not tell which keys exist.
    stored = found[0].key_hash if found is not None else "0" * 64
    if not hmac.compare_digest(stored, hash_key(key.strip())) or found is None:
        raise Unauthorized(f"API key {prefix} is not valid")
    row, identity = found
    if row.revoked_at is not None:
        raise Unauthorized(f"API key {prefix} was revoked")
    return _read(row, identity)


def touch_api_key(*, session: Session, key_id: int, now: datetime | None = None) -> bool:
    """Record a use; at most once per TOUCH_EVERY. True when the row was written."""
    now = now or utcnow()
    result = session.exec(
        update(ApiKey)
        .where(
            col(ApiKey.id) == key_id,
            or_(col(ApiKey.last_used_at).is_(None), col(ApiKey.last_used_at) <= now - TOUCH_EVERY),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def needs_touch(key: ApiKeyRead, now: datetime) -> bool:
    return key.last_used_at is None or now - key.last_used_at >= TOUCH_EVERY


def list_api_keys(
    *, session: Session, account_id: int, include_revoked: bool = True
) -> list[ApiKeyRead]:
    """The keys of every identity of an account, oldest first."""
    stmt = (
        select(ApiKey, Identity)
        .join(Identity, col(Identity.id) == col(ApiKey.identity_id))
        .where(Identity.account_id == account_id)
        .order_by(col(ApiKey.id))
    )
    if not include_revoked:
        stmt = stmt.where(col(ApiKey.revoked_at).is_(None))
    return [_read(row, identity) for row, identity in session.exec(stmt).all()]


def revoke_api_key(
    *, session: Session, prefix: str, account_id: int | None = None, now: datetime | None = None
) -> ApiKeyRead:
    """Revoke a key by its prefix (``atk_1234abcd``; a whole key works too). With
    ``account_id`` only that account's keys can be revoked. Revoking twice keeps the first time."""
    prefix = prefix.strip()[:12]
    if not _PREFIX_RE.match(prefix):
        raise InvalidRequest(f"an API key prefix looks like atk_1234abcd, got {prefix!r}")
    found = session.exec(
        select(ApiKey, Identity)
        .join(Identity, col(Identity.id) == col(ApiKey.identity_id))
        .where(ApiKey.prefix == prefix)
    ).first()
    if found is None or (account_id is not None and found[1].account_id != account_id):
        raise NotFound(f"no API key {prefix}")
    row, identity = found
    if row.revoked_at is None:
        row.revoked_at = now or utcnow()
        session.add(row)
        session.flush()
    return _read(row, identity)


def set_key_model(*, session: Session, key_id: int, model: str | None) -> None:
    """Remember the checkpoint an A1111 client picked (``None``: the registry's default)."""
    session.exec(
        update(ApiKey)
        .where(col(ApiKey.id) == key_id)
        .values(model=model)
        .execution_options(synchronize_session=False)
    )


def _read(row: ApiKey, identity: Identity) -> ApiKeyRead:
    if row.id is None or identity.id is None:
        raise RuntimeError("API key read before it was flushed")
    return ApiKeyRead(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        identity_id=identity.id,
        platform=identity.platform,
        platform_user_id=identity.platform_user_id,
        account_id=identity.account_id,
        model=row.model,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )
