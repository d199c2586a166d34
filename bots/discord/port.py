"""``DiscordPort``: the chat core's port (``bots.common.port.ChatPort``) over discord.py.
A reply to the interaction being handled goes through it (its deferred response first, then
followups); later edits and results go through the interaction's webhook while its token lives,
then through the channel (Send Messages / Attach Files checked), then by DM. Images are
attachments within the place's upload limit; what does not fit goes as a gallery link."""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import discord

from bots.common import texts
from bots.common.delivery import RetryLater, Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import Picture, Posted
from bots.discord.components import view_for
from bots.discord.files import fit_all
from bots.discord.hooks import DEFAULT_SIZE_LIMIT, Hook, Hooks, hook_of

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters in a message's content
NO_POST_HERE = (
    "I could not post your images in <#{channel}>: I lack {missing} there. "
    "Ask a server admin to allow it; meanwhile your images are in your gallery: {link}"
)

# The interaction being handled in this task: a reply to it answers through it.
_current: contextvars.ContextVar[discord.Interaction[Any] | None] = contextvars.ContextVar(
    "discord_interaction", default=None
)


def reply_key(interaction: discord.Interaction[Any]) -> str:
    """What a ``Who.message_id`` holds for an interaction: replies to it answer through it."""
    return f"i{interaction.id}"


@contextlib.contextmanager
def answering(interaction: discord.Interaction[Any]) -> Iterator[None]:
    """Within this block, the port answers ``interaction`` itself where it can."""
    token = _current.set(interaction)
    try:
        yield
    finally:
        _current.reset(token)


def _content(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


class DiscordPort:
    """The Discord side of the chat core."""

    platform = PLATFORM
    photo_max_bytes = DEFAULT_SIZE_LIMIT  # Discord sends every image as a file anyway

    def __init__(self, bot: AtelierBot, hooks: Hooks) -> None:
        self.bot = bot
        self.hooks = hooks
        # The gallery link of a person, for results that cannot be attached (set by the bot).
        self.gallery_text: Callable[[str], Awaitable[str]] | None = None
        # Interactions whose deferred "thinking" response is still to be replaced.
        self._thinking: set[int] = set()

    def thinking(self, interaction: discord.Interaction[Any]) -> None:
        """``interaction`` was deferred with a "thinking" message: the first reply replaces it."""
        self._thinking.add(interaction.id)

    def still_thinking(self, interaction: discord.Interaction[Any]) -> bool:
        """Its "thinking" message is still there: no reply has replaced it."""
        return interaction.id in self._thinking

    def done_with(self, interaction: discord.Interaction[Any]) -> None:
        self._thinking.discard(interaction.id)

    def _webhook(self, hook: Hook) -> discord.Webhook:
        assert self.bot.application_id is not None
        return discord.Webhook.partial(self.bot.application_id, hook.token, client=self.bot)

    def _channel(self, chat_id: str) -> discord.abc.Messageable:
        channel = self.bot.get_channel(int(chat_id))
        if isinstance(channel, discord.abc.Messageable):
            return channel
        return self.bot.get_partial_messageable(int(chat_id))

    # Replies -------------------------------------------------------------------------------

    async def send(
        self,
        chat_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        reply_to: str | None = None,
    ) -> str:
        view = view_for(keyboard)
        content = _content(text)
        inter = _current.get()
        if inter is not None and str(inter.channel_id) == chat_id and not inter.is_expired():
            hook = hook_of(inter)
            message: discord.Message
            if inter.id in self._thinking:
                self._thinking.discard(inter.id)
                message = await inter.edit_original_response(content=content, view=view)
            elif not inter.response.is_done():
                await inter.response.send_message(content, view=view or discord.utils.MISSING)
                message = await inter.original_response()
            else:
                message = await inter.followup.send(
                    content, view=view or discord.utils.MISSING, wait=True
                )
            await self.hooks.remember(message.id, hook)
            return str(message.id)
        sent = await self._channel(chat_id).send(content, view=view or discord.utils.MISSING)
        return str(sent.id)

    async def edit(
        self, chat_id: str, message_id: str, text: str, keyboard: Keyboard | None = None
    ) -> None:
        await self._edit(chat_id, message_id, content=_content(text), view=view_for(keyboard))

    async def edit_keyboard(self, chat_id: str, message_id: str, keyboard: Keyboard) -> None:
        await self._edit(chat_id, message_id, view=view_for(keyboard))

    async def _edit(self, chat_id: str, message_id: str, **fields: Any) -> None:
        """Through the press being handled (its message, ephemeral ones too), else the
        message's live webhook, else the channel."""
        inter = _current.get()
        try:
            if (
                inter is not None
                and inter.message is not None
                and str(inter.message.id) == message_id
                and not inter.is_expired()
            ):
                await inter.edit_original_response(**fields)
                return
            hook = await self.hooks.get(message_id)
            if hook is not None:
                try:
                    await self._webhook(hook).edit_message(int(message_id), **fields)
                    return
                except discord.HTTPException as exc:
                    if exc.status != 401:  # an expired token: the channel still works
                        raise
            partial = self._channel(chat_id)
            if isinstance(partial, discord.abc.GuildChannel | discord.PartialMessageable):
                await partial.get_partial_message(int(message_id)).edit(**fields)
        except discord.RateLimited as exc:
            raise RetryLater(exc.retry_after) from exc
        except discord.NotFound:
            log.info("message %s in %s is gone; not edited", message_id, chat_id)
        except discord.Forbidden as exc:
            raise Undeliverable(f"channel {chat_id}: {exc.text}") from exc

    async def delete(self, chat_id: str, message_id: str) -> None:
        with contextlib.suppress(discord.HTTPException):
            hook = await self.hooks.get(message_id)
            if hook is not None:
                await self._webhook(hook).delete_message(int(message_id))
                return
            partial = self._channel(chat_id)
            if isinstance(partial, discord.abc.GuildChannel | discord.PartialMessageable):
                await partial.get_partial_message(int(message_id)).delete()

    async def send_private(self, user_id: str, text: str) -> bool:
        try:
            dm = await self.bot.create_dm(discord.Object(id=int(user_id)))
            await dm.send(_content(text))
        except discord.HTTPException as exc:
            log.info("cannot message discord:%s privately (%s)", user_id, exc)
            return False
        return True

    async def is_admin(self, chat_id: str, user_id: str) -> bool:
        """Manage Server, as the interaction being handled says (Discord sends the member's
        permissions with each interaction; the bot keeps no member list)."""
        inter = _current.get()
        if inter is None or str(inter.user.id) != user_id:
            return False
        return inter.permissions.manage_guild

    async def show_working(self, chat_id: str) -> None:
        return None  # the status message itself shows the steps; typing needs Send Messages

    # Results -------------------------------------------------------------------------------

    async def post_images(
        self,
        chat_id: str,
        pictures: Sequence[Picture],
        keyboard: Keyboard,
        *,
        as_files: bool,
        posted: Posted,
    ) -> None:
        """The images as attachments of one message with the buttons: a followup while the
        job's interaction token lives, else in the channel, else by DM to the asker."""
        if not pictures or await posted.has("1"):
            return
        job = await self.bot.client.jobs.job(posted.job_id)
        owner = job.delivery.extra.get("owner", "")
        hook = await self.hooks.get(job.delivery.message_id)
        limit = hook.size_limit if hook is not None else self._size_limit(chat_id)
        fitted, left_out = fit_all([(p.png, p.filename) for p in pictures], limit)
        lines = [f"{i + 1}. {p.caption}" for i, p in enumerate(pictures)]
        if left_out and owner and self.gallery_text is not None:
            numbers = ", ".join(str(i + 1) for i in left_out)
            lines.append(f"Too large to attach here ({numbers}): {await self.gallery_text(owner)}")
        content = _content("\n".join(lines))
        files = [
            discord.File(io.BytesIO(f.data), f.filename, description=pictures[i].caption[:1000])
            for i, f in fitted
        ]
        view = view_for(keyboard)
        if await posted.in_doubt("1"):  # an earlier process may have posted them
            content, files = _content(texts.maybe_posted(list(range(1, len(pictures) + 1)))), []
        else:
            await posted.sending("1")
        try:
            if hook is not None and await self._followup(hook, content, files, view):
                await posted.add("1")
                return
            await self._post_in_channel(
                chat_id, owner, content, files, view, job.delivery.message_id
            )
        except discord.RateLimited as exc:
            await posted.not_sent("1")
            raise RetryLater(exc.retry_after) from exc
        except discord.HTTPException as exc:
            await posted.not_sent("1")  # Discord answered: nothing was posted
            if exc.status == 429:  # discord.py gave up waiting: the delivery loop waits on
                raise RetryLater(_retry_after(exc)) from exc
            raise
        await posted.add("1")

    async def _followup(
        self, hook: Hook, content: str, files: list[discord.File], view: discord.ui.View | None
    ) -> bool:
        """Post through the interaction's webhook; False if Discord says the token is gone."""
        try:
            await self._webhook(hook).send(
                content, files=files, view=view or discord.utils.MISSING, wait=True
            )
        except discord.HTTPException as exc:
            if exc.status not in (401, 404):  # the token expired, or Discord forgot it
                raise
            for f in files:
                f.reset()
            return False
        return True

    async def _post_in_channel(
        self,
        chat_id: str,
        owner: str,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
        status: str | None,
    ) -> None:
        channel = self.bot.get_channel(int(chat_id))
        missing = _missing_permissions(channel, bool(files))
        if not missing:
            # The asker no longer watches the interaction: ping them, and them only.
            mention, pings = "", discord.AllowedMentions.none()
            if owner:
                mention = f"<@{owner}> "
                pings = discord.AllowedMentions(users=[discord.Object(id=int(owner))])
            try:
                await self._channel(chat_id).send(
                    _content(mention + content),
                    files=files,
                    view=view or discord.utils.MISSING,
                    allowed_mentions=pings,
                )
                return
            except discord.Forbidden as exc:
                missing = [exc.text or "permission"]
            except discord.NotFound as exc:
                raise Undeliverable(f"channel {chat_id} is gone") from exc
        # Not allowed here: to the person directly, and say why where they asked.
        for f in files:
            f.reset()
        link = await self.gallery_text(owner) if owner and self.gallery_text else "/gallery"
        why = NO_POST_HERE.format(channel=chat_id, missing=" and ".join(missing), link=link)
        if owner:
            try:
                dm = await self.bot.create_dm(discord.Object(id=int(owner)))
                await dm.send(
                    _content(why + "\n" + content), files=files, view=view or discord.utils.MISSING
                )
                return
            except discord.HTTPException as exc:
                log.info("cannot DM discord:%s the results (%s)", owner, exc)
        if status is not None:  # editing its own message needs no Send Messages
            with contextlib.suppress(Undeliverable, RetryLater, discord.HTTPException):
                await self._edit(chat_id, status, content=_content(why), view=None)
        raise Undeliverable(f"channel {chat_id}: no permission to post ({', '.join(missing)}) "
                            "and no DM to the person")

    def _size_limit(self, chat_id: str) -> int:
        channel = self.bot.get_channel(int(chat_id))
        guild = getattr(channel, "guild", None)
        return guild.filesize_limit if isinstance(guild, discord.Guild) else DEFAULT_SIZE_LIMIT


def _retry_after(exc: discord.HTTPException) -> float:
    try:
        return float(exc.response.headers.get("Retry-After", 1.0))
    except (TypeError, ValueError):
        return 1.0


def _missing_permissions(channel: object, files: bool) -> list[str]:
    """What the bot lacks to post (with files) in ``channel``, as Discord names it."""
    if not isinstance(channel, discord.abc.GuildChannel):
        return []  # a DM, or a channel the cache does not know: let Discord decide
    perms = channel.permissions_for(channel.guild.me)
    needed = [("View Channel", perms.view_channel), ("Send Messages", perms.send_messages)]
    if files:
        needed.append(("Attach Files", perms.attach_files))
    return [name for name, ok in needed if not ok]
