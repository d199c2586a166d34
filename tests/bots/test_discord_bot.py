"""The Discord bot's frame with the real discord.py against the fake Discord: logging in,
explicit command sync, /help, per-server settings (admins only, kept across restarts), the
token masked when Discord refuses it."""

from __future__ import annotations

import asyncio
import re

import pytest

from bots.discord import guilds
from bots.discord.run import start_bot
from core.errors import ConfigError
from testing.discord import payloads as p
from testing.discord.server import FakeDiscord
from tests.bots.discord_conftest import DiscordStack, discord_settings_for

ALICE = 100_000_000_000_000_001


async def test_commands_are_synced_only_when_asked(discord_backend: DiscordStack) -> None:
    fake = discord_backend.fake
    await discord_backend.start_bot()
    assert fake.identifies == 1
    assert not fake.calls_to("/commands", ok=None), "a plain start must not sync commands"
    await discord_backend.stop_bot()

    await discord_backend.start_bot(sync=True, guild_id=p.GUILD_ID)
    synced = fake.commands[str(p.GUILD_ID)]
    names = {c["name"] for c in synced}
    assert {"help", "server-settings"} <= names
    settings_cmd = next(c for c in synced if c["name"] == "server-settings")
    # Hidden from members without Manage Server unless the server says otherwise.
    assert settings_cmd["default_member_permissions"] == str(p.MANAGE_GUILD)
    assert "global" not in fake.commands
    await discord_backend.stop_bot()

    await discord_backend.start_bot(sync=True)  # globally
    assert {c["name"] for c in fake.commands["global"]} == names
    imagine = next(c for c in fake.commands["global"] if c["name"] == "imagine")
    options = {o["name"]: o for o in imagine["options"]}
    assert options["prompt"]["required"] and options["style"]["autocomplete"]
    assert options["image"]["type"] == 11 and options["n"]["max_value"] == 4
    assert [c["value"] for c in options["aspect"]["choices"]][:2] == ["1:1", "3:2"]


async def test_help_answers_the_asker_only_listing_every_command(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    inter = await fake.slash(ALICE, "help")
    await fake.wait_for(lambda: inter.callback, what="the /help answer")
    assert inter.callback is not None
    body = inter.callback.json
    assert body["type"] == 4
    assert body["data"]["flags"] & 64  # ephemeral
    listed = re.findall(r"^/([\w-]+)", body["data"]["content"], re.MULTILINE)
    registered = [c.name for c in discord_stack.discord.tree.get_commands()]
    assert sorted(listed) == sorted(registered)  # /apikey and /server-settings included


async def test_server_settings_are_for_admins_and_survive_a_restart(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    refused = await fake.slash(ALICE, "server-settings", [p.option("nsfw", True)])
    await fake.wait_for(lambda: refused.callback, what="the refusal")
    assert "admins" in refused.callback.json["data"]["content"]  # type: ignore[union-attr]
    assert not (await guilds.load(discord_stack.state, p.GUILD_ID)).nsfw

    fake.guild.admins.add(ALICE)
    changed = await fake.slash(
        ALICE,
        "server-settings",
        [p.option("nsfw", True), p.option("steps_cap", 25), p.option("anyone_can_press", True)],
    )
    await fake.wait_for(lambda: changed.callback, what="the change")
    text = changed.callback.json["data"]["content"]  # type: ignore[union-attr]
    assert "steps cap: 25" in text and "NSFW outside age-restricted channels: yes" in text

    await discord_stack.stop_bot()
    await discord_stack.start_bot()
    prefs = await guilds.load(discord_stack.state, p.GUILD_ID)
    assert (prefs.nsfw, prefs.steps_cap, prefs.anyone_can_press) == (True, 25, True)

    unknown = await fake.slash(ALICE, "server-settings", [p.option("model", "nope")])
    await fake.wait_for(lambda: unknown.callback, what="the unknown model answer")
    assert "unknown model 'nope'" in unknown.callback.json["data"]["content"]  # type: ignore[union-attr]


async def test_a_refused_token_is_a_config_error_without_the_token(
    discord_backend: DiscordStack, tmp_path: object, redis_url: str
) -> None:
    fake: FakeDiscord = discord_backend.fake
    wrong = "MTIz.wrong.token-that-must-not-be-shown"
    settings = discord_settings_for(
        discord_backend.settings.data_dir.parent, redis_url, fake, discord_token=wrong
    )
    with pytest.raises(ConfigError) as info:
        await start_bot(
            settings, discord_backend.client, discord_backend.broker, state=discord_backend.state
        )
    assert "ATELIER_DISCORD_TOKEN" in str(info.value)
    assert wrong not in str(info.value)


async def test_the_bot_stops_its_core_once(discord_stack: DiscordStack) -> None:
    """discord.py closes the client again itself when the gateway connection ends (no
    reconnect); the core's stop (its journal's close among it) must run only once."""
    bot = discord_stack.discord
    stops: list[int] = []
    stop = bot.core.stop

    async def counted() -> None:
        stops.append(1)
        await stop()

    bot.core.stop = counted  # type: ignore[method-assign]
    await asyncio.gather(bot.close(), bot.close())
    await discord_stack.stop_bot()
    assert stops == [1]
