"""/apikey on both bots: a key shown once to the asker only (never in a group), acting as the
asker's account, stored as a hash only."""

from __future__ import annotations

import re

from sqlmodel import select

from core.jobs import Requester
from storage.apikeys import hash_key, verify_api_key
from storage.models import ApiKey
from tests.bots.conftest import Stack
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE
from tests.bots.test_discord_account import ask

KEY_RE = re.compile(r"atk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")


def texts_to(stack: Stack, chat: int) -> list[str]:
    return [c.params["text"] for c in stack.fake.calls_of("sendMessage", chat=chat)]


async def assert_key_of(stack: Stack, platform: str, user: str, key: str) -> None:
    account = await stack.client.account(Requester(platform=platform, platform_user_id=user))
    with stack.sessions() as s:
        found = verify_api_key(session=s, key=key)
        rows = s.exec(select(ApiKey)).all()
    assert found.account_id == account.id
    assert (found.platform, found.platform_user_id) == (platform, user)
    # Stored hashed: the key itself is in no column.
    assert [r.key_hash for r in rows] == [hash_key(key)]
    assert all(key not in (r.key_hash, r.prefix, r.name) for r in rows)


async def test_telegram_apikey_in_private_and_never_in_a_group(stack: Stack) -> None:
    fake, user, group = stack.fake, 3101, -7101
    await fake.send(user, "/apikey")
    made = await fake.wait_for(
        lambda: next((t for t in texts_to(stack, user) if "API key" in t), None),
        what="an API key",
    )
    found = KEY_RE.search(made)
    assert found is not None
    assert "Bearer" in made and "https://atelier.example/api/v1" in made
    assert "https://atelier.example/sdapi/v1" in made
    await assert_key_of(stack, "telegram", str(user), found.group(0))

    # In a group: the key goes to the asker privately, nothing of it is posted to the group.
    await fake.send(user, "/apikey", chat=group)
    await fake.wait_for(
        lambda: len([t for t in texts_to(stack, user) if KEY_RE.search(t)]) == 2,
        what="a second key, in private",
    )
    assert not any(KEY_RE.search(t) for t in texts_to(stack, group))
    commands = fake.calls_of("setMyCommands")[0].json("commands")
    assert "apikey" in {c["command"] for c in commands}


async def test_discord_apikey_is_ephemeral_and_verifies(discord_stack: DiscordStack) -> None:
    _, answer = await ask(discord_stack, ALICE, "apikey")  # ask() checks it is ephemeral
    found = KEY_RE.search(answer.json["content"])
    assert found is not None
    await assert_key_of(discord_stack, "discord", str(ALICE), found.group(0))
