"""Accounts: get-or-create by identity (race safe) and linking identities with one-time codes."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from core.errors import Conflict, InvalidRequest, NotFound
from core.jobs import DeliveryTarget, JobStatus
from core.request import GenerationRequest
from core.settings import Tier
from storage import accounts, gallery, jobs, ledger
from storage.db import session_factory, transaction

Tx = Callable[[], AbstractContextManager[Session]]
TTL = timedelta(minutes=10)


def _resolve(tx: Tx, platform: str, user: str, now: datetime) -> accounts.AccountRead:
    with tx() as s:
        return accounts.resolve_account(
            session=s, platform=platform, platform_user_id=user, default_tier="free", now=now
        )


def _code(tx: Tx, identity_id: int, now: datetime) -> str:
    with tx() as s:
        return accounts.create_link_code(session=s, identity_id=identity_id, now=now, ttl=TTL).code


def _redeem(tx: Tx, code: str, identity_id: int, now: datetime) -> accounts.AccountRead:
    with tx() as s:
        return accounts.redeem_link_code(session=s, code=code, identity_id=identity_id, now=now)


def _job_with_image(tx: Tx, account: accounts.AccountRead, prompt: str, now: datetime) -> str:
    assert account.identity is not None
    with tx() as s:
        job, _ = jobs.create_job(
            session=s,
            idempotency_key=uuid.uuid4().hex,
            account_id=account.id,
            identity_id=account.identity.id,
            request=GenerationRequest(prompt=prompt),
            delivery=DeliveryTarget(frontend="telegram", chat_id="1"),
            cost=1,
            now=now,
        )
        gallery.add_images(
            session=s,
            job_id=job.id,
            images=[
                gallery.NewImage(
                    index=0,
                    seed=1,
                    width=512,
                    height=512,
                    blob_key="ab/cd/x.png",
                    sha256="0" * 64,
                    prompt=prompt,
                    styles=("anime",),
                )
            ],
            now=now,
        )
    return job.id


def test_resolve_account_is_get_or_create(tx: Tx, now: datetime) -> None:
    first = _resolve(tx, "telegram", "42", now)
    again = _resolve(tx, "telegram", "42", now)
    other = _resolve(tx, "discord", "42", now)
    assert first.id == again.id != other.id
    assert first.tier == "free"
    assert first.identity is not None and first.identity.platform_user_id == "42"
    with pytest.raises(InvalidRequest), tx() as s:
        accounts.resolve_account(
            session=s, platform="", platform_user_id="1", default_tier="free", now=now
        )


def test_concurrent_first_contact_makes_one_account(engine: Engine, now: datetime) -> None:
    factory = session_factory(engine)
    gate = threading.Barrier(8)

    def first_message(_: int) -> int:
        gate.wait()
        with transaction(factory) as s:
            return accounts.resolve_account(
                session=s, platform="discord", platform_user_id="777", default_tier="free", now=now
            ).id

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(first_message, range(8)))
    assert len(ids) == 1


def test_link_shares_credits_and_gallery(tx: Tx, tiers: dict[str, Tier], now: datetime) -> None:
    a = _resolve(tx, "telegram", "alice", now)
    b = _resolve(tx, "discord", "alice#1", now)
    assert a.identity is not None and b.identity is not None
    with tx() as s:
        ledger.grant(session=s, account_id=b.id, amount=5, key="b-pack", now=now)
        # b has a job in flight holding its 3 daily credits and 2 from its pack
        ledger.reserve(session=s, account_id=b.id, job_id="b-job", amount=5, now=now, tiers=tiers)
    _job_with_image(tx, a, "a red lighthouse", now)
    _job_with_image(tx, b, "a blue lighthouse", now + timedelta(seconds=1))

    code = _code(tx, a.identity.id, now)
    assert len(code) == 7 and code[3] == "-"
    linked = _redeem(tx, code.lower().replace("-", " "), b.identity.id, now + timedelta(minutes=1))
    assert linked.id == a.id
    assert linked.identity is not None and linked.identity.id == b.identity.id

    # Either identity now reaches the same account, balance and gallery.
    assert _resolve(tx, "discord", "alice#1", now).id == a.id
    with tx() as s:
        bal = ledger.balance(session=s, account_id=a.id, now=now, tiers=tiers)
        page = gallery.list_images(session=s, account_id=a.id)
        ids = accounts.list_identities(session=s, account_id=a.id)
        moved = jobs.list_jobs(session=s, account_id=a.id)
    assert (bal.daily_left, [p.amount for p in bal.packs]) == (3, [3])  # b's daily is dropped
    assert sorted(i.prompt for i in page.items) == ["a blue lighthouse", "a red lighthouse"]
    with tx() as s:  # the filters find the moved images too (their style rows moved with them)
        styled = gallery.list_images(session=s, account_id=a.id, style="anime")
        from_discord = gallery.list_images(session=s, account_id=a.id, platform="discord")
        # Search too: the moved image's words are keyed by its new account.
        searched = gallery.list_images(session=s, account_id=a.id, search="blue lighthouse")
        left_behind = gallery.list_images(session=s, account_id=b.id, search="blue")
    assert [i.prompt for i in searched.items] == ["a blue lighthouse"]
    assert left_behind.items == []
    assert sorted(i.prompt for i in styled.items) == ["a blue lighthouse", "a red lighthouse"]
    assert [i.prompt for i in from_discord.items] == ["a blue lighthouse"]
    assert {i.platform for i in ids} == {"telegram", "discord"}
    assert len(moved) == 2

    # The in-flight job fails: its pack part returns to the pack (now a's), its daily part lapses.
    with tx() as s:
        ledger.release(session=s, job_id="b-job", now=now + timedelta(minutes=2))
        bal = ledger.balance(session=s, account_id=a.id, now=now, tiers=tiers)
        audits = [ledger.audit(session=s, account_id=x) for x in (a.id, b.id)]
    assert (bal.daily_left, [p.amount for p in bal.packs]) == (3, [5])
    assert all(x.balanced for x in audits), audits
    with tx() as s:
        assert ledger.balance(session=s, account_id=b.id, now=now, tiers=tiers).total == 0
        merged = accounts.get_account(session=s, account_id=b.id)
    assert merged.merged_into_id == a.id


def test_link_codes_are_one_time_expiring_and_not_your_own(tx: Tx, now: datetime) -> None:
    a = _resolve(tx, "telegram", "a", now)
    b = _resolve(tx, "discord", "b", now)
    c = _resolve(tx, "web", "c", now)
    assert a.identity and b.identity and c.identity

    own = _code(tx, a.identity.id, now)
    with pytest.raises(Conflict, match="your own link code"):
        _redeem(tx, own, a.identity.id, now)

    expired = _code(tx, a.identity.id, now)
    with pytest.raises(Conflict, match=f"link code {expired} expired at 12:10 UTC"):
        _redeem(tx, expired, b.identity.id, now + TTL)

    code = _code(tx, a.identity.id, now)
    _redeem(tx, code, b.identity.id, now)
    with pytest.raises(Conflict, match="already used"):
        _redeem(tx, code, c.identity.id, now)

    # b is on a's account now, so a fresh code from a is pointless for b.
    with pytest.raises(Conflict, match="already linked"):
        _redeem(tx, _code(tx, a.identity.id, now), b.identity.id, now)

    with pytest.raises(NotFound, match="does not exist"):
        _redeem(tx, "ABC-DEF", c.identity.id, now)
    with pytest.raises(InvalidRequest, match="looks like K7P-3QX"):
        _redeem(tx, "0O1-IL!", c.identity.id, now)


def test_link_codes_use_an_unambiguous_alphabet(tx: Tx, now: datetime) -> None:
    a = _resolve(tx, "telegram", "a", now)
    assert a.identity is not None
    codes = {_code(tx, a.identity.id, now) for _ in range(20)}
    assert len(codes) == 20
    for code in codes:
        assert accounts.normalize_code(code) == code
        assert not set(code) & set("01OIL")


def test_jobs_follow_the_link(tx: Tx, now: datetime) -> None:
    a = _resolve(tx, "telegram", "a", now)
    b = _resolve(tx, "discord", "b", now)
    assert a.identity and b.identity
    job_id = _job_with_image(tx, b, "moved", now)
    _redeem(tx, _code(tx, a.identity.id, now), b.identity.id, now)
    with tx() as s:
        assert jobs.get_job(session=s, job_id=job_id).account_id == a.id
        assert jobs.running_jobs_count(session=s, account_id=a.id) == 1
        jobs.set_status(session=s, job_id=job_id, status=JobStatus.running)
        assert jobs.running_jobs_count(session=s, account_id=b.id) == 0
