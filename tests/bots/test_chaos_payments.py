"""The chaos campaign's payment fault at small size (bench/chaos.py injects it among the
others): the real Telegram and Discord bots against their fakes, every scenario a few times and
some at once: a successful_payment delivered two or three times, a refund before or between
its payments, credits spent before a refund; entitlement events duplicated and reordered, a
refund the bot missed while away, and the start-up reconcile racing a live event. Each charge
must credit once, a refund take back what is left (what was spent is owed), and every ledger
balance."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from bench.chaos_payments import (
    DISCORD_SCENARIOS,
    SHOP_TOML,
    TELEGRAM_SCENARIOS,
    DiscordBot,
    Payments,
)
from testing.discord.server import TOKEN as DISCORD_TOKEN
from testing.discord.server import FakeDiscord
from testing.telegram import FakeTelegram
from tests.bots.conftest import Stack, settings_for
from tests.bots.discord_conftest import DiscordStack
from tests.conftest import forbid_in_fast_tier

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def payments_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite (one writer at a time) and PostgreSQL (row locks: the races are real there)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'atelier.db'}"
        return
    forbid_in_fast_tier("PostgreSQL")
    name = f"atelier_pay_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def bots(
    tmp_path: Path, redis_url: str, fake: FakeTelegram, payments_db: str
) -> AsyncIterator[tuple[Stack, DiscordStack]]:
    discord = FakeDiscord(DISCORD_TOKEN)
    settings = settings_for(
        tmp_path, redis_url, fake, database_url=payments_db, discord_token=DISCORD_TOKEN,
        discord_api_base_url=discord.api_base, discord_gateway_url=discord.gateway_url,
    )
    (settings.data_dir / "shop.toml").write_text(SHOP_TOML)
    telegram = Stack(settings, fake, None, settings.data_dir)
    on_discord = DiscordStack(settings, discord, None, settings.data_dir)  # type: ignore[arg-type]
    await fake.start()
    await discord.start()
    await telegram.start_bot()
    await on_discord.start_bot()
    try:
        yield telegram, on_discord
    finally:
        await on_discord.close()
        await telegram.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_duplicated_and_reordered_payment_updates_credit_once(
    bots: tuple[Stack, DiscordStack],
) -> None:
    telegram, discord = bots
    payments = Payments(
        telegram.settings, telegram.fake, discord.fake,
        DiscordBot(down=discord.stop_bot, up=discord.start_bot), sessions=telegram.sessions,
    )
    # Every scenario of each platform twice, two faults at a time (so the two bursts'
    # updates interleave as well), paired so each Telegram scenario meets several Discord
    # ones.
    pairs = list(zip(TELEGRAM_SCENARIOS * 2, itertools.islice(
        itertools.cycle(DISCORD_SCENARIOS[1:] + DISCORD_SCENARIOS[:1]),
        2 * len(TELEGRAM_SCENARIOS)), strict=True))
    for n in range(0, len(pairs), 2):
        await asyncio.gather(*(
            payments.fault(0.1 * (n + i), telegram=tg, discord=dc)
            for i, (tg, dc) in enumerate(pairs[n:n + 2])
        ))
    await payments.settle(120)
    violations = await asyncio.to_thread(payments.audit)
    assert violations == [], "\n".join(violations + [c.detail for c in payments.charges])
    assert set(payments.counts()) == {f"telegram {s}" for s in TELEGRAM_SCENARIOS} | {
        f"discord {s}" for s in DISCORD_SCENARIOS}
    # Spent before a refund: the refund left what was spent alone (owed) and said so.
    spent = [c for c in payments.charges if c.spent]
    assert spent, [c.detail for c in payments.charges]
    told = [str(c.params.get("text", "")) for c in telegram.fake.calls_of("sendMessage")]
    assert any("was refunded" in t and "already spent" in t for t in told), told
    # A refund that beat its payment: the payment's answer says nothing was added.
    assert any("refunded, so nothing was added" in t or "before it was credited" in t
               for t in told), told
