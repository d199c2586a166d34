"""API keys: shown once, stored hashed, checked, listed per account, revoked, stamped on use."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlmodel import Session, select

from core.errors import InvalidRequest, NotFound, Unauthorized
from storage import accounts, apikeys
from storage.models import ApiKey

Tx = Callable[[], AbstractContextManager[Session]]


def _identity_id(account: accounts.AccountRead) -> int:
    assert account.identity is not None
    return account.identity.id


def test_a_key_is_shown_once_and_stored_hashed(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    acc = new_account()
    with tx() as s:
        made = apikeys.create_api_key(session=s, identity_id=_identity_id(acc), name="ST", now=now)
    assert made.key.startswith(made.info.prefix + "_")
    assert len(made.key) == 12 + 1 + 43
    with tx() as s:
        rows = s.exec(select(ApiKey)).all()
    assert len(rows) == 1
    stored = rows[0].model_dump()
    assert made.key not in {str(v) for v in stored.values()}
    assert rows[0].key_hash == apikeys.hash_key(made.key)
    with tx() as s:
        found = apikeys.verify_api_key(session=s, key=made.key)
    assert found.id == made.info.id
    assert (found.platform, found.account_id, found.name) == ("telegram", acc.id, "ST")
    assert "key" not in found.model_dump() and "key_hash" not in found.model_dump()


def test_wrong_malformed_and_revoked_keys_are_refused(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    acc = new_account()
    with tx() as s:
        made = apikeys.create_api_key(session=s, identity_id=_identity_id(acc), now=now)
    wrong = made.key[:-1] + ("A" if made.key[-1] != "A" else "B")
    with tx() as s, pytest.raises(Unauthorized, match=f"API key {made.info.prefix} is not valid"):
        apikeys.verify_api_key(session=s, key=wrong)
    with tx() as s, pytest.raises(Unauthorized) as err:
        apikeys.verify_api_key(session=s, key="hunter2")
    assert "hunter2" not in err.value.message and "malformed" in err.value.message
    unknown = "atk_00000000_" + made.key.split("_", 2)[2]
    with tx() as s, pytest.raises(Unauthorized, match="atk_00000000 is not valid"):
        apikeys.verify_api_key(session=s, key=unknown)

    with tx() as s:
        revoked = apikeys.revoke_api_key(session=s, prefix=made.info.prefix, now=now)
    assert revoked.revoked_at == now
    with tx() as s, pytest.raises(Unauthorized, match="was revoked"):
        apikeys.verify_api_key(session=s, key=made.key)
    with tx() as s:  # twice: the first time stays
        again = apikeys.revoke_api_key(session=s, prefix=made.key, now=now + timedelta(hours=1))
    assert again.revoked_at == now


def test_listing_and_revoking_are_per_account(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    alice, bob = new_account(), new_account()
    with tx() as s:
        a1 = apikeys.create_api_key(session=s, identity_id=_identity_id(alice), now=now)
        a2 = apikeys.create_api_key(session=s, identity_id=_identity_id(alice), now=now)
        b1 = apikeys.create_api_key(session=s, identity_id=_identity_id(bob), now=now)
    with tx() as s:
        listed = apikeys.list_api_keys(session=s, account_id=alice.id)
    assert [k.prefix for k in listed] == [a1.info.prefix, a2.info.prefix]
    with tx() as s, pytest.raises(NotFound, match=f"no API key {b1.info.prefix}"):
        apikeys.revoke_api_key(session=s, prefix=b1.info.prefix, account_id=alice.id)
    with tx() as s:
        apikeys.revoke_api_key(session=s, prefix=a1.info.prefix, account_id=alice.id)
        live = apikeys.list_api_keys(session=s, account_id=alice.id, include_revoked=False)
    assert [k.prefix for k in live] == [a2.info.prefix]
    with tx() as s:  # bob's key still works
        assert apikeys.verify_api_key(session=s, key=b1.key).account_id == bob.id
    with tx() as s, pytest.raises(InvalidRequest, match="looks like atk_1234abcd, got 'nope'"):
        apikeys.revoke_api_key(session=s, prefix="nope")


def test_last_used_is_written_at_most_once_a_minute(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    acc = new_account()
    with tx() as s:
        made = apikeys.create_api_key(session=s, identity_id=_identity_id(acc), now=now)
    assert made.info.last_used_at is None and apikeys.needs_touch(made.info, now)
    with tx() as s:
        assert apikeys.touch_api_key(session=s, key_id=made.info.id, now=now)
        soon = now + timedelta(seconds=30)
        assert not apikeys.touch_api_key(session=s, key_id=made.info.id, now=soon)
    with tx() as s:
        seen = apikeys.verify_api_key(session=s, key=made.key)
    assert seen.last_used_at == now
    assert not apikeys.needs_touch(seen, now + timedelta(seconds=30))
    later = now + timedelta(seconds=61)
    with tx() as s:
        assert apikeys.touch_api_key(session=s, key_id=made.info.id, now=later)
        assert apikeys.verify_api_key(session=s, key=made.key).last_used_at == later


def test_a_key_follows_its_identity_into_a_linked_account(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    keeper = new_account()
    joiner = new_account(platform="discord")
    with tx() as s:
        made = apikeys.create_api_key(session=s, identity_id=_identity_id(joiner), now=now)
        code = accounts.create_link_code(
            session=s, identity_id=_identity_id(keeper), now=now, ttl=timedelta(minutes=10)
        )
    with tx() as s:
        accounts.redeem_link_code(
            session=s, code=code.code, identity_id=_identity_id(joiner), now=now
        )
    with tx() as s:
        found = apikeys.verify_api_key(session=s, key=made.key)
        listed = apikeys.list_api_keys(session=s, account_id=found.account_id)
    assert found.platform == "discord"
    assert made.info.prefix in [k.prefix for k in listed]


def test_the_chosen_model_is_remembered(
    tx: Tx, new_account: Callable[..., accounts.AccountRead], now: datetime
) -> None:
    acc = new_account()
    with tx() as s:
        made = apikeys.create_api_key(session=s, identity_id=_identity_id(acc), now=now)
        apikeys.set_key_model(session=s, key_id=made.info.id, model="tiny")
    with tx() as s:
        assert apikeys.verify_api_key(session=s, key=made.key).model == "tiny"
