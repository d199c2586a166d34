"""``DiscordPort``: the chat core's port (``bots.common.port.ChatPort``) over discord.py.
A reply to the interaction being answered (a ``Reply``, handed in as ``via``) goes through it
(its deferred response first, then followups; a private one as an ephemeral answer); later
edits and results go through the interaction's webhook while its token lives, then through the
channel (Send Messages / Attach Files checked), then by DM. Images are attachments within the
place's upload limit; what does not fit goes as a gallery link."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from bots.common.delivery import NotAllowed, NotSent, RetryLater, Undeliverable
from bots.common.keyboards import Keyboard
from bots.common.port import CONTROL_PART, Destination, Outgoing, Part
from bots.discord.components import view_for
from bots.discord.files import fit_all
from bots.discord.hooks import DEFAULT_SIZE_LIMIT, Hook, Hooks, hook_of

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000  # characters in a message's content

ALBUM_MAX = 10  # attachments in one message


@dataclass(eq=False)
class Reply:
    """The interaction being answered, as ``Who.via``: replies to its asker go through it.
    ``thinking``: it was deferred with a public "thinking" message, which the first reply
    replaces (or which goes, never edited to say something private)."""

    interaction: discord.Interaction[Any]
    thinking: bool = False


def interaction_of(via: object) -> discord.Interaction[Any] | None:
    return via.interaction if isinstance(via, Reply) else None


def reply_key(interaction: discord.Interaction[Any]) -> str:
    """What a ``Who.message_id`` holds for an interaction: replies to it answer through it."""
    return f"i{interaction.id}"


def _content(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


class DiscordPort:
    """The Discord side of the chat core."""

    platform = PLATFORM
    photo_max_bytes = DEFAULT_SIZE_LIMIT  # Discord sends every image as a file anyway
    album_max = ALBUM_MAX
    keyboard_on_album = True

    def __init__(self, bot: AtelierBot, hooks: Hooks) -> None:
        self.bot = bot
        self.hooks = hooks

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
        via: object = None,
        private: bool = False,
    ) -> str | None:
        view = view_for(keyboard)
        content = _content(text)
        if private and isinstance(via, Reply):
            await self._private(via, content, view)
            return None
        inter = interaction_of(via)
        if (
            isinstance(via, Reply)
            and inter is not None  # for mypy: a Reply has one
            and str(inter.channel_id) == chat_id
            and not inter.is_expired()
        ):
            hook = hook_of(inter)
            message: discord.Message
            if via.thinking:
                via.thinking = False
                message = await inter.edit_original_response(content=content, view=view)
            elif not inter.response.is_done():
                answered = await inter.response.send_message(
                    content, view=view or discord.utils.MISSING
                )
                # Discord returns the message it made; read it back only where it did not.
                made = answered.resource
                message = (
                    made if isinstance(made, discord.Message) else await inter.original_response()
                )
            else:
                message = await inter.followup.send(
                    content, view=view or discord.utils.MISSING, wait=True
                )
            await self.hooks.remember(message.id, hook)
            return str(message.id)
        sent = await self._channel(chat_id).send(content, view=view or discord.utils.MISSING)
        return str(sent.id)

    async def _private(self, reply: Reply, content: str, view: discord.ui.View | None) -> None:
        """For the asker alone: the first answer where nothing was shown yet, else an
        ephemeral followup once the public "thinking" message is gone."""
        inter = reply.interaction
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        if not inter.response.is_done():
            try:
                await inter.response.send_message(content, ephemeral=True, **extra)
            except discord.HTTPException as exc:  # too late: Discord dropped the interaction
                log.info("could not answer interaction %s: %s", inter.id, exc)
            return
        if reply.thinking:
            await drop_thinking(reply)
        await inter.followup.send(content, ephemeral=True, **extra)

    async def edit(
        self,
        chat_id: str,
        message_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        via: object = None,
    ) -> None:
        await self._edit(
            chat_id, message_id, via, content=_content(text), view=view_for(keyboard)
        )

    async def edit_keyboard(
        self, chat_id: str, message_id: str, keyboard: Keyboard, *, via: object = None
    ) -> None:
        await self._edit(chat_id, message_id, via, view=view_for(keyboard))

    async def _edit(self, chat_id: str, message_id: str, via: object, **fields: Any) -> None:
        """Through the press being answered (its message, ephemeral ones too), else the
        message's live webhook, else the channel."""
        inter = interaction_of(via)
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

    async def is_admin(self, chat_id: str, user_id: str, *, via: object = None) -> bool:
        """Manage Server, as the interaction being answered says (Discord sends the member's
        permissions with each interaction; the bot keeps no member list)."""
        inter = interaction_of(via)
        if inter is None or str(inter.user.id) != user_id:
            return False
        return inter.permissions.manage_guild

    async def show_working(self, chat_id: str) -> None:
        return None  # the status message itself shows the steps; typing needs Send Messages

    # Results -------------------------------------------------------------------------------

    async def send_part(self, to: Destination, part: Part, outgoing: Outgoing) -> str:
        """The pictures as attachments of one message (their captions as its lines) with the
        keyboard, or a text: a followup while the job's interaction token lives, else in the
        channel (NotAllowed without Send Messages / Attach Files there); ``to.private``: by
        DM to the asker."""
        hook = await self.hooks.get(to.status_id)
        files: list[discord.File] = []
        text = part.text
        if part.pictures:
            limit = hook.size_limit if hook is not None else self._size_limit(to.chat_id)
            fitted, left_out = fit_all([(p.png, p.filename) for p in part.pictures], limit)
            # Numbered as the V/U buttons count the images; a control map is none of them.
            lines = [p.caption if part.name == CONTROL_PART else f"{part.first + i}. {p.caption}"
                     for i, p in enumerate(part.pictures)]
            if left_out and to.gallery is not None:
                numbers = ", ".join(str(part.first + i) for i in left_out)
                lines.append(f"Too large to attach here ({numbers}): {await to.gallery()}")
            text = "\n".join(lines)
            files = [
                discord.File(
                    io.BytesIO(f.data), f.filename, description=part.pictures[i].caption[:1000]
                )
                for i, f in fitted
            ]
        if part.intro:
            text = part.intro + "\n" + text
        content, view = _content(text), view_for(part.keyboard)
        await outgoing.sending()
        try:
            if to.private:
                dm = await self.bot.create_dm(discord.Object(id=int(to.owner)))
                dm_sent = await dm.send(content, files=files, view=view or discord.utils.MISSING)
                return str(dm_sent.id)
            if hook is not None:
                sent = await self._followup(hook, content, files, view)
                if sent is not None:
                    return sent
            return await self._post_in_channel(to, content, files, view)
        except discord.RateLimited as exc:
            raise RetryLater(exc.retry_after) from exc
        except discord.HTTPException as exc:
            if exc.status == 429:  # discord.py gave up waiting: the delivery loop waits on
                raise RetryLater(_retry_after(exc)) from exc
            raise NotSent(f"channel {to.chat_id}: {exc.status} {exc.text}") from exc

    async def _followup(
        self, hook: Hook, content: str, files: list[discord.File], view: discord.ui.View | None
    ) -> str | None:
        """Post through the interaction's webhook; None if Discord says the token is gone."""
        try:
            sent = await self._webhook(hook).send(
                content, files=files, view=view or discord.utils.MISSING, wait=True
            )
        except discord.HTTPException as exc:
            if exc.status not in (401, 404):  # the token expired, or Discord forgot it
                raise
            for f in files:
                f.reset()
            return None
        return str(sent.id)

    async def _post_in_channel(
        self,
        to: Destination,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
    ) -> str:
        chat_id, owner = to.chat_id, to.owner
        place = f"<#{chat_id}>"
        missing = _missing_permissions(self.bot.get_channel(int(chat_id)), bool(files))
        if missing:
            raise NotAllowed(place, missing)  # never tried where it is not allowed
        # The asker no longer watches the interaction: ping them, and them only.
        mention, pings = "", discord.AllowedMentions.none()
        if owner:
            mention = f"<@{owner}> "
            pings = discord.AllowedMentions(users=[discord.Object(id=int(owner))])
        try:
            sent = await self._channel(chat_id).send(
                _content(mention + content),
                files=files,
                view=view or discord.utils.MISSING,
                allowed_mentions=pings,
            )
        except discord.Forbidden as exc:
            raise NotAllowed(place, [exc.text or "permission"]) from exc
        except discord.NotFound as exc:
            raise Undeliverable(f"channel {chat_id} is gone") from exc
        return str(sent.id)

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


async def drop_thinking(reply: Reply) -> None:
    """Remove the public "thinking" message of ``reply`` (never edited to say something
    private)."""
    reply.thinking = False
    try:
        await reply.interaction.delete_original_response()
    except discord.HTTPException as exc:
        log.info("could not remove the deferred message of %s: %s", reply.interaction.id, exc)
