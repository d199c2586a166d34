"""Across platforms: /link between a Telegram and a Discord identity gives one balance and one
gallery, and each job goes back to the platform it came from. Both real bots (PTB and
discord.py) run against their fakes over one backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bots.discord.run import RunningBot, start_bot
from core.jobs import Requester
from core.signing import verify
from testing.discord import payloads as p
from testing.discord.server import TOKEN, FakeDiscord
from testing.telegram import FakeTelegram
from tests.bots.conftest import TINY, Stack, settings_for
from tests.bots.discord_helpers import ALICE, images_of

TG_USER = 7001


class BothBots(Stack):
    """The Telegram stack plus the Discord bot on the same client, broker and state."""

    discord_fake: FakeDiscord
    discord_bot: RunningBot | None = None

    @property
    def fake_dc(self) -> FakeDiscord:
        return self.discord_fake


@pytest.fixture
async def both(
    tmp_path: Path, redis_url: str, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[BothBots]:
    dc = FakeDiscord(TOKEN)
    settings = settings_for(
        tmp_path,
        redis_url,
        fake,
        discord_token=TOKEN,
        discord_api_base_url=dc.api_base,
        discord_gateway_url=dc.gateway_url,
    )
    s = BothBots(settings, fake, ray_worker, tiny_dir)
    s.discord_fake = dc
    await dc.start()
    await s.start()
    s.discord_bot = await start_bot(
        settings,
        s.client,
        s.broker,
        state=s.state,
        reconnect=False,
        guild_ready_timeout=0.05,
        clock=dc.clock.now,
        progress_interval_s=0.3,
    )
    try:
        yield s
    finally:
        await s.discord_bot.stop()
        await s.close()
        await dc.stop()


def _ephemeral_text(dc: FakeDiscord, token: str) -> str | None:
    edits = [c for c in dc.calls_to("PATCH /webhooks/") if token in c.path]
    return edits[-1].json["content"] if edits else None


async def _discord_says(dc: FakeDiscord, command: str, **options: Any) -> str:
    inter = await dc.slash(ALICE, command, [p.option(k, v) for k, v in options.items()])
    text: str = await dc.wait_for(lambda: _ephemeral_text(dc, inter.token), 30, f"/{command}")
    assert inter.callback is not None and inter.callback.json["data"]["flags"] & 64
    return text


async def test_link_gives_one_balance_and_gallery_and_jobs_go_home(both: BothBots) -> None:
    tg, dc = both.fake, both.fake_dc
    await tg.send(TG_USER, "/link")
    made = await tg.wait_for(
        lambda: next((c.params["text"] for c in tg.calls_of("sendMessage", chat=TG_USER)
                      if "link code" in c.params["text"]), None),
        what="a link code",
    )
    code = made.split("link code: ")[1].split()[0]
    assert "Linked" in await _discord_says(dc, "link", code=code)

    telegram = Requester(platform="telegram", platform_user_id=str(TG_USER))
    discord_ = Requester(platform="discord", platform_user_id=str(ALICE))
    account = await both.client.account(telegram)
    assert (await both.client.account(discord_)).id == account.id

    # One gallery: the Discord link opens the account's gallery.
    gallery = await _discord_says(dc, "gallery")
    token = gallery.split("/g/")[1].split()[0]
    key = both.settings.resolved_signing_key
    assert verify(key, token, purpose="gallery", now=datetime.now(UTC)) == str(account.id)

    # One balance: spent on Discord, seen on Telegram; the job comes back to Discord only.
    before = (await both.client.balance(telegram)).total
    inter = await dc.slash(ALICE, "imagine", [p.option("prompt", f"a lighthouse {TINY}")])
    await dc.wait_for(lambda: images_of(dc, inter.token), 90, "the images on Discord")
    (job,) = await both.finished(1)
    assert (await both.client.balance(telegram)).total == before - job.cost
    assert not tg.calls_of("sendPhoto")

    # A Telegram job goes back to Telegram, not to Discord.
    posted_on_discord = len([c for c in dc.calls if c.files])
    await tg.send(TG_USER, f"/imagine a kite {TINY}")
    await tg.wait_call("sendPhoto", chat=TG_USER, timeout=90)
    await both.finished(2)
    await asyncio.sleep(1.0)
    assert len([c for c in dc.calls if c.files]) == posted_on_discord
    assert (await both.client.balance(discord_)).total == before - job.cost - both.jobs()[1].cost
