"""One Cog per feature; each gets the bot (and through it the chat core) in its constructor."""

from __future__ import annotations

from bots.discord.cogs.account import Account
from bots.discord.cogs.buy import Buy
from bots.discord.cogs.grid import Grid
from bots.discord.cogs.help import Help
from bots.discord.cogs.imagine import Imagine
from bots.discord.cogs.server import ServerSettings
from bots.discord.cogs.settings import Settings

ALL = (Imagine, Grid, Account, Settings, ServerSettings, Help, Buy)
