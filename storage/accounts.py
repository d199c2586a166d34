"""Accounts and the platform identities that reach them; one-time link codes join identities
(Telegram + Discord + web) onto one account, so that credits and gallery are shared."""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.errors import AccountBlocked, Conflict, InvalidRequest, NotFound
from storage import ledger
from storage.models import Account, Identity, Image, ImageStyle, Job, LinkCode, utcnow

# No 0/O or 1/I/L: people read these codes off one screen and type them into another.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 6
_CODE_RE = re.compile(rf"^[{CODE_ALPHABET}]{{{CODE_LENGTH}}}$")


class IdentityRead(BaseModel):
    id: int
    platform: str
    platform_user_id: str
    account_id: int
    display_name: str | None
    created_at: datetime


class AccountRead(BaseModel):
    id: int
    tier: str
    created_at: datetime
    merged_into_id: int | None = None  # set once a link merged this account into another
    identity: IdentityRead | None = None  # the identity the account was reached through
    blocked_at: datetime | None = None  # set by an operator: see ``refuse_blocked``
    blocked_reason: str | None = None

    @property
    def blocked(self) -> bool:
        return self.blocked_at is not None


class LinkCodeRead(BaseModel):
    code: str
    account_id: int
    identity_id: int
    expires_at: datetime


def resolve_account(
    *,
    session: Session,
    platform: str,
    platform_user_id: str,
    display_name: str | None = None,
    default_tier: str,
    now: datetime | None = None,
) -> AccountRead:
    """The account behind a platform identity, created with ``default_tier`` on first contact.

    Safe under races: two first messages at once both try to insert; the loser's savepoint
    rolls back on the unique (platform, platform_user_id) constraint and it reads the winner's.
    """
    if not platform or len(platform) > 16:
        raise InvalidRequest(f"platform must be 1 to 16 characters, got {platform!r}")
    if not platform_user_id or len(platform_user_id) > 64:
        raise InvalidRequest(
            f"platform_user_id must be 1 to 64 characters, got {platform_user_id[:80]!r}"
        )
    display_name = display_name[:128] if display_name else None
    now = now or utcnow()
    identity = _find_identity(session, platform, platform_user_id)
    if identity is None:
        try:
            with session.begin_nested():
                account = Account(tier=default_tier, created_at=now)
                session.add(account)
                session.flush()
                identity = Identity(
                    platform=platform,
                    platform_user_id=platform_user_id,
                    account_id=_id(account.id),
                    display_name=display_name,
                    created_at=now,
                )
                session.add(identity)
                session.flush()
        except IntegrityError:
            identity = _find_identity(session, platform, platform_user_id)
            if identity is None:
                raise
    elif display_name and identity.display_name != display_name:
        identity.display_name = display_name
        session.add(identity)
        session.flush()
    return _account_read(session, identity.account_id, identity)


def find_account(*, session: Session, platform: str, platform_user_id: str) -> AccountRead:
    """The account behind an existing identity; NotFound if that identity never used Atelier."""
    identity = _find_identity(session, platform, platform_user_id)
    if identity is None:
        raise NotFound(f"no account for {platform}:{platform_user_id}")
    return _account_read(session, identity.account_id, identity)


def get_account(*, session: Session, account_id: int) -> AccountRead:
    return _account_read(session, account_id, None)


def list_identities(*, session: Session, account_id: int) -> list[IdentityRead]:
    rows = session.exec(
        select(Identity).where(Identity.account_id == account_id).order_by(col(Identity.id))
    ).all()
    return [_identity_read(i) for i in rows]


def set_tier(
    *, session: Session, account_id: int, tier: str, known_tiers: Collection[str]
) -> AccountRead:
    """Change an account's tier (takes effect from the next daily allowance)."""
    if tier not in known_tiers:
        raise InvalidRequest(f"unknown tier {tier!r}; choose one of {sorted(known_tiers)}")
    account = ledger.lock_accounts(session, [account_id])[account_id]
    account.tier = tier
    session.add(account)
    session.flush()
    return _account_read(session, account_id, None)


def block(
    *, session: Session, account_id: int, reason: str, now: datetime | None = None
) -> AccountRead:
    """Block an account: admission refuses its new jobs and the shop its payments
    (``refuse_blocked``). Blocking again replaces the reason and keeps the first time."""
    reason = " ".join(reason.split())
    if not reason or len(reason) > 300:
        raise InvalidRequest(f"a block reason must be 1 to 300 characters, got {len(reason)}")
    account = ledger.lock_accounts(session, [account_id])[account_id]
    if account.merged_into_id is not None:
        raise Conflict(
            f"account {account_id} was merged into account {account.merged_into_id}; "
            "block that one"
        )
    account.blocked_at = account.blocked_at or now or utcnow()
    account.blocked_reason = reason
    session.add(account)
    session.flush()
    return _account_read(session, account_id, None)


def unblock(*, session: Session, account_id: int) -> AccountRead:
    """Lift a block; unblocking an account that is not blocked changes nothing."""
    account = ledger.lock_accounts(session, [account_id])[account_id]
    account.blocked_at = None
    account.blocked_reason = None
    session.add(account)
    session.flush()
    return _account_read(session, account_id, None)


def refuse_blocked(account: AccountRead) -> None:
    """AccountBlocked when an operator blocked ``account``: the one check admission (every
    new job, from any front end or API) and the shop's pre-checkout call, before anything is
    charged or sold."""
    if account.blocked_at is None:
        return
    reason = account.blocked_reason or "no reason given"
    raise AccountBlocked(
        f"this account is blocked ({reason}); nothing was charged",
        reason=reason,
    )


def create_link_code(
    *, session: Session, identity_id: int, now: datetime, ttl: timedelta
) -> LinkCodeRead:
    """A one-time code like ``K7P-3QX`` that another identity redeems to join this account."""
    if ttl <= timedelta(0):
        raise InvalidRequest(f"ttl must be positive, got {ttl}")
    identity = _load_identity(session, identity_id)
    for _ in range(5):
        raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        link = LinkCode(
            code=format_code(raw),
            account_id=identity.account_id,
            identity_id=identity_id,
            created_at=now,
            expires_at=now + ttl,
        )
        try:
            with session.begin_nested():
                session.add(link)
                session.flush()
        except IntegrityError:
            continue  # the same code is live elsewhere (1 in 887 million); draw again
        return LinkCodeRead.model_validate(link, from_attributes=True)
    raise Conflict("could not draw an unused link code; try again")


def redeem_link_code(
    *, session: Session, code: str, identity_id: int, now: datetime
) -> AccountRead:
    """Move the redeeming identity onto the code maker's account and merge its old account in.

    The maker's account survives with its tier. From the redeemer's old account, every identity,
    job and image moves over, and its unexpired packs move with admin rows on both sides. Its
    remaining daily allowance for today is dropped (an expire row records it): allowances do not
    add up by linking. Holds of jobs still in flight stay on the buckets they came from; a
    release refunds whoever owns the bucket then.
    """
    normalized = normalize_code(code)
    link = session.exec(
        select(LinkCode)
        .where(LinkCode.code == normalized)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if link is None:
        raise NotFound(f"link code {normalized} does not exist; check it or make a new one")
    if link.used_at is not None:
        raise Conflict(f"link code {normalized} was already used; make a new one")
    if link.expires_at <= now:
        raise Conflict(
            f"link code {normalized} expired at {link.expires_at:%H:%M} UTC; make a new one"
        )
    if link.identity_id == identity_id:
        raise Conflict("that is your own link code; enter it from your other account")
    redeemer = _load_identity(session, identity_id)
    maker = _load_identity(session, link.identity_id)
    source, target = redeemer.account_id, maker.account_id
    if source == target:
        raise Conflict("these accounts are already linked")
    ledger.lock_accounts(session, [source, target])
    # Re-read under the account locks: a concurrent link may have moved either identity.
    redeemer = _load_identity(session, identity_id)
    maker = _load_identity(session, link.identity_id)
    if (redeemer.account_id, maker.account_id) != (source, target):
        raise Conflict("these accounts changed while linking; try again")
    used = session.exec(
        update(LinkCode)
        .where(col(LinkCode.code) == normalized, col(LinkCode.used_at).is_(None))
        .values(used_at=now, used_by_identity_id=identity_id)
        .execution_options(synchronize_session=False)
    )
    if used.rowcount != 1:
        raise Conflict(f"link code {normalized} was already used; make a new one")
    _merge(session, source=source, target=target, now=now)
    return _account_read(session, target, _load_identity(session, identity_id))


def normalize_code(code: str) -> str:
    """``k7p 3qx`` -> ``K7P-3QX``; raise InvalidRequest if it cannot be a link code."""
    raw = re.sub(r"[^0-9A-Za-z]", "", code).upper()
    if not _CODE_RE.match(raw):
        raise InvalidRequest(f"a link code looks like K7P-3QX, got {code.strip()[:20]!r}")
    return format_code(raw)


def format_code(raw: str) -> str:
    half = CODE_LENGTH // 2
    return f"{raw[:half]}-{raw[half:]}"


# Internals -------------------------------------------------------------------------------------


def _merge(session: Session, *, source: int, target: int, now: datetime) -> None:
    ledger.merge_credits(session, source_id=source, target_id=target, now=now)
    # A block follows the person: linking a blocked account to a fresh one lifts nothing.
    blocked = session.get(Account, source)
    joined = session.get(Account, target)
    if blocked is not None and joined is not None and blocked.blocked_at is not None \
            and joined.blocked_at is None:
        joined.blocked_at, joined.blocked_reason = blocked.blocked_at, blocked.blocked_reason
        session.add(joined)
    for table in (Identity, Job, Image, ImageStyle):
        session.exec(
            update(table)
            .where(col(table.account_id) == source)
            .values(account_id=target)
            .execution_options(synchronize_session=False)
        )
    session.exec(
        update(LinkCode)
        .where(col(LinkCode.account_id) == source, col(LinkCode.used_at).is_(None))
        .values(account_id=target)
        .execution_options(synchronize_session=False)
    )
    # Keep merge chains one hop long, so merged_into_id always names a live account.
    session.exec(
        update(Account)
        .where(col(Account.merged_into_id) == source)
        .values(merged_into_id=target)
        .execution_options(synchronize_session=False)
    )
    session.exec(
        update(Account)
        .where(col(Account.id) == source)
        .values(merged_into_id=target)
        .execution_options(synchronize_session=False)
    )
    session.flush()


def _id(value: int | None) -> int:
    if value is None:
        raise RuntimeError("row has no id; was it flushed?")
    return value


def _find_identity(session: Session, platform: str, platform_user_id: str) -> Identity | None:
    return session.exec(
        select(Identity)
        .where(Identity.platform == platform, Identity.platform_user_id == platform_user_id)
        .execution_options(populate_existing=True)
    ).first()


def _load_identity(session: Session, identity_id: int) -> Identity:
    identity = session.exec(
        select(Identity).where(Identity.id == identity_id).execution_options(populate_existing=True)
    ).first()
    if identity is None:
        raise NotFound(f"identity {identity_id} does not exist")
    return identity


def _identity_read(identity: Identity) -> IdentityRead:
    return IdentityRead.model_validate(identity, from_attributes=True)


def _account_read(session: Session, account_id: int, identity: Identity | None) -> AccountRead:
    account = session.exec(
        select(Account).where(Account.id == account_id).execution_options(populate_existing=True)
    ).first()
    if account is None:
        raise NotFound(f"account {account_id} does not exist")
    return AccountRead(
        id=_id(account.id),
        tier=account.tier,
        created_at=account.created_at,
        merged_into_id=account.merged_into_id,
        identity=None if identity is None else _identity_read(identity),
        blocked_at=account.blocked_at,
        blocked_reason=account.blocked_reason,
    )
