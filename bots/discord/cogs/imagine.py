"""``/imagine`` (typed options, style and model autocomplete, an image to redraw) and
``/cancel``. ``/imagine`` is checked and priced before Discord gets an answer, so a refusal is
that answer, for the asker alone; an accepted job runs behind a public deferred message."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bots.common import account, jobs
from bots.common.core import ChatCore
from bots.common.port import Who
from bots.common.prefs import ASPECTS
from bots.discord import guilds
from bots.discord.autocomplete import model_choices, style_choices
from bots.discord.bot import acknowledge
from bots.discord.chat import who
from bots.discord.cogs.replies import ephemeral
from bots.discord.options import Options, command_text
from bots.discord.port import Reply, drop_thinking
from core.errors import AtelierError, InvalidRequest
from core.request import MAX_SEED

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

log = logging.getLogger(__name__)

_STEPS_FLAG = re.compile(r"(?<!\S)(?:--|[\u2014\u2013])steps[\s=]+(\d+)", re.IGNORECASE)
_MODEL_FLAG = re.compile(r"(?<!\S)(?:--|[\u2014\u2013])model(?=[\s=]|$)", re.IGNORECASE)
# Discord wants an answer within 3 s: a check slower than this (an image to fetch, a busy
# store) answers with a public deferral first, and a refusal then follows privately.
CHECK_WITHIN_S = 2.0


def server_defaults(text: str, prefs: guilds.GuildPrefs) -> str:
    """The server's default model (unless one is asked for) and its cap on steps (a request
    over it is refused, naming both numbers)."""
    if prefs.model and not _MODEL_FLAG.search(text):
        text += f" --model {prefs.model}"
    cap = prefs.steps_cap
    if cap is not None:
        asked = [int(n) for n in _STEPS_FLAG.findall(text)]
        if any(n > cap for n in asked):
            raise InvalidRequest(f"this server allows at most {cap} steps, got {max(asked)}")
        if not asked:
            text += f" --steps {cap}"
    return text


T = TypeVar("T")


async def answer_checked(
    core: ChatCore, asker: Who, reply: Reply, checking: asyncio.Task[T],
    start: Callable[[T], Awaitable[object]], *, repeat: Callable[[T], bool] = lambda _: False,
) -> None:
    """A slash command checked and priced before Discord gets an answer (/imagine, /grid): wait
    for ``checking``, deferring publicly first if it runs past ``CHECK_WITHIN_S`` (Discord wants
    an answer within 3 s); then ``start`` behind the deferred message. A refusal goes to the
    asker alone (``jobs.refuse``); a "thinking" message left without a status is removed."""
    try:
        done, _ = await asyncio.wait({checking}, timeout=CHECK_WITHIN_S)
        if not done and not await defer(reply):
            return
        checked = await checking
        if repeat(checked):
            return
        if not reply.interaction.response.is_done() and not await defer(reply):
            return
        await start(checked)
    except AtelierError as exc:
        await jobs.refuse(core, asker, exc)
    finally:
        checking.cancel()
        if reply.thinking:  # failed before any status
            await drop_thinking(reply)


async def defer(reply: Reply) -> bool:
    """Defer publicly: a "thinking" message that the job's status replaces; False when the
    interaction was answered already."""
    if not await acknowledge(reply.interaction, thinking=True):
        return False
    reply.thinking = True
    return True


class Imagine(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Make images from a prompt")
    @app_commands.describe(
        prompt="What to draw; flags work too, e.g. 'a fox --ar 16:9'",
        style="A style from the list",
        aspect="Shape of the image",
        n="How many images (1-4)",
        seed="Seed, to repeat a result",
        steps="Denoising steps (more: slower, finer)",
        cfg="How closely to follow the prompt (guidance)",
        negative="What to keep out of the image",
        model="Model to use",
        image="An image to redraw (img2img), or to follow with --control canny",
        strength="How much of the image to repaint (0-1)",
    )
    @app_commands.choices(aspect=[app_commands.Choice(name=a, value=a) for a in ASPECTS])
    async def imagine(
        self,
        interaction: discord.Interaction[Any],
        prompt: app_commands.Range[str, 1, 1500],
        style: str | None = None,
        aspect: str | None = None,
        n: app_commands.Range[int, 1, 4] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        steps: app_commands.Range[int, 1, 150] | None = None,
        cfg: app_commands.Range[float, 0.0, 30.0] | None = None,
        negative: str | None = None,
        model: str | None = None,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.01, 1.0] | None = None,
    ) -> None:
        """Check and price first, so a refusal is the first answer and the asker's alone;
        then defer publicly and make the images behind the deferred message."""
        options = Options(style, aspect, n, seed, steps, cfg, negative, model, strength)
        reply = Reply(interaction)
        asker = who(interaction, via=reply)
        checking = asyncio.create_task(self._check(interaction, asker, prompt, options, image))
        await answer_checked(
            self.bot.core, asker, reply, checking,
            lambda checked: jobs.start_checked(self.bot.core, asker, checked),
            # the same interaction again: its first delivery answered it
            repeat=lambda checked: checked.quote.repeat_of is not None,
        )

    async def _check(
        self,
        interaction: discord.Interaction[Any],
        asker: Who,
        prompt: str,
        options: Options,
        image: discord.Attachment | None,
    ) -> jobs.Checked:
        """What the command asks for with the server's defaults, checked and priced."""
        text = command_text(prompt, options)
        text = server_defaults(text, await guilds.load(self.bot.state, interaction.guild_id))
        return await jobs.check(
            self.bot.core,
            asker,
            text,
            idempotency_key=f"discord:{interaction.id}",
            photo=await self._read(image),
        )

    async def _read(self, image: discord.Attachment | None) -> bytes | None:
        if image is None:
            return None
        limit = self.bot.settings.limits.max_upload_bytes
        if image.size > limit:
            raise InvalidRequest(
                f"the image is {image.size / 1e6:.1f} MB; the most I take is {limit / 1e6:.0f} MB"
            )
        if image.content_type is not None and not image.content_type.startswith("image/"):
            raise InvalidRequest(f"the attachment is {image.content_type}, not an image")
        return await image.read()

    @imagine.autocomplete("style")
    async def _style(
        self, interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return style_choices(self.bot.styles, current)

    @imagine.autocomplete("model")
    async def _model(
        self, interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return model_choices(await self.bot.client.runnable.available(), current)

    @app_commands.command(name="cancel", description="Stop your latest queued or running job")
    async def cancel(self, interaction: discord.Interaction[Any]) -> None:
        """Cancel the person's latest job."""
        await ephemeral(self.bot, interaction, partial(account.cancel_latest, self.bot.core))
