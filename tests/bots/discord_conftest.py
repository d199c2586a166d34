"""Discord fixtures (imported by conftest.py): the fake Discord, settings pointing the bot at
it, and a stack running the real discord.py bot over the same backend as the Telegram suite
(real Redis, the store, local Ray with the tiny pipeline, a Dispatcher in the loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots.discord.bot import AtelierBot
from bots.discord.run import RunningBot, start_bot
from core.jobs import Requester
from core.settings import Settings, load_settings
from testing.discord.server import TOKEN, FakeDiscord
from tests.bots.conftest import Stack


def discord_settings_for(
    tmp_path: Path, redis_url: str | None, fake: FakeDiscord, **extra: Any
) -> Settings:
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models.toml").write_text('default = "tiny"\n')
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite:///{tmp_path / 'atelier.db'}",
        "redis_url": redis_url,
        "discord_token": TOKEN,
        "discord_api_base_url": fake.api_base,
        "discord_gateway_url": fake.gateway_url,
        "public_base_url": "https://atelier.example",
        "signing_key": "k" * 40,
        **extra,
    }
    return load_settings(**options, _env_file=None)


class DiscordStack(Stack):
    """The backend plus the Discord bot (``start_bot`` / ``stop_bot`` restart it)."""

    fake: FakeDiscord  # type: ignore[assignment]
    running: RunningBot | None = None

    async def start_bot(self, **options: Any) -> None:
        options.setdefault("progress_interval_s", 0.3)
        self.running = await start_bot(
            self.settings,
            self.client,
            self.broker,
            state=self.state,
            reconnect=False,
            guild_ready_timeout=0.05,
            clock=self.fake.clock.now,
            **options,
        )

    @property
    def discord(self) -> AtelierBot:
        assert self.running is not None, "the Discord bot is not running"
        return self.running.bot

    async def stop_bot(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None

    async def balance(self, user: int, platform: str = "discord") -> int:
        requester = Requester(platform=platform, platform_user_id=str(user))
        return (await self.client.balance(requester)).total


@pytest.fixture
def discord_fake() -> FakeDiscord:
    return FakeDiscord(TOKEN)


@pytest.fixture
def discord_settings(tmp_path: Path, redis_url: str, discord_fake: FakeDiscord) -> Settings:
    return discord_settings_for(tmp_path, redis_url, discord_fake)


@pytest.fixture
async def discord_stack(
    discord_settings: Settings, discord_fake: FakeDiscord, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[DiscordStack]:
    s = DiscordStack(discord_settings, discord_fake, ray_worker, tiny_dir)  # type: ignore[arg-type]
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def discord_backend(
    discord_settings: Settings, discord_fake: FakeDiscord, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[DiscordStack]:
    """The stack without the bot: for tests that start it their own way."""
    s = DiscordStack(discord_settings, discord_fake, ray_worker, tiny_dir)  # type: ignore[arg-type]
    await s.start(bot=False)
    try:
        yield s
    finally:
        await s.close()
