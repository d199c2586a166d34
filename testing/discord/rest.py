"""The fake Discord's REST side: the routes discord.py calls (login, command sync, interaction
callbacks, webhook followups and edits, channel messages, DMs) and the messages they make."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from testing.discord import payloads as p

JSON = "application/json"  # exactly: discord.py does not decode "...; charset=utf-8"
RESPOND_WITHIN_S = 3.0
TOKEN_TTL_S = 15 * 60
EPHEMERAL = 1 << 6
LOADING = 1 << 7


@dataclass
class Upload:
    """A file in a multipart request: its ``files[N]`` part, file name and bytes."""

    part: str
    filename: str
    data: bytes


@dataclass
class Call:
    """One REST request: the route it matched (``POST /channels/{id}/messages``), its path,
    JSON payload (``payload_json`` for multipart), uploads and what the fake answered."""

    method: str
    path: str
    route: str = ""
    json: Any = None
    query: dict[str, str] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    result: Any = None
    # Who the message this call made or edited pinged (``p.pinged``), as Discord worked out
    # from its content and ``allowed_mentions``.
    pings: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def components(self) -> list[dict[str, Any]]:
        """Every component (button) of the message this call sent."""
        rows = (self.json or {}).get("components") or []
        return [c for row in rows for c in row.get("components", [])]

    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in self.components() if "custom_id" in c]


@dataclass
class Interaction:
    """An interaction the fake sent: its token, who, where, and what became of it."""

    id: int
    token: str
    type: int
    user: int
    channel_id: int
    payload: dict[str, Any]
    created: float  # fake clock
    sent_at: float = field(default_factory=time.monotonic)
    callback: Call | None = None
    original: dict[str, Any] | None = None  # the response message, once there is one


class DiscordError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Handler = Callable[[Call, re.Match[str]], Awaitable[Any]]


class DiscordRest:
    """Route handlers over the state ``FakeDiscord`` keeps (mixed into it)."""

    token: str
    clock: p.Clock
    snowflake: p.Snowflakes
    guild: p.Guild
    messages: dict[int, dict[str, Any]]
    interactions: dict[int, Interaction]
    dm_channels: dict[int, int]
    dm_closed: set[int]
    attachment_size_limit: int
    attachments: dict[str, bytes]
    commands: dict[str, list[dict[str, Any]]]
    _routes: list[tuple[str, re.Pattern[str], str, Handler]]

    @property
    def gateway_url(self) -> str:
        raise NotImplementedError

    def add_attachment(self, data: bytes, filename: str = "photo.png") -> dict[str, Any]:
        raise NotImplementedError

    def _route(self, method: str, template: str) -> Callable[[Handler], Handler]:
        pattern = re.compile(
            "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        )

        def add(handler: Handler) -> Handler:
            self._routes.append((method, pattern, f"{method} {template}", handler))
            return handler

        return add

    def _add_routes(self) -> None:
        r = self._route
        r("GET", "/users/@me")(self._me)
        r("GET", "/oauth2/applications/@me")(self._application)
        r("GET", "/gateway")(self._gateway_info)
        r("PUT", "/applications/{app}/commands")(self._sync)
        r("PUT", "/applications/{app}/guilds/{guild}/commands")(self._sync)
        r("GET", "/applications/{app}/commands")(self._list_commands)
        r("GET", "/applications/{app}/guilds/{guild}/commands")(self._list_commands)
        r("POST", "/interactions/{id}/{token}/callback")(self._callback)
        r("POST", "/webhooks/{app}/{token}")(self._followup)
        r("GET", "/webhooks/{app}/{token}/messages/{message}")(self._get_webhook_message)
        r("PATCH", "/webhooks/{app}/{token}/messages/{message}")(self._edit_webhook_message)
        r("DELETE", "/webhooks/{app}/{token}/messages/{message}")(self._delete_webhook_message)
        r("POST", "/channels/{channel}/messages")(self._channel_send)
        r("PATCH", "/channels/{channel}/messages/{message}")(self._channel_edit)
        r("GET", "/channels/{channel}/messages/{message}")(self._channel_get)
        r("DELETE", "/channels/{channel}/messages/{message}")(self._channel_delete)
        r("POST", "/users/@me/channels")(self._open_dm)
        r("POST", "/channels/{channel}/typing")(self._typing)
        premium: Any = self  # the Premium mixin's routes (testing/discord/premium.py)
        r("GET", "/applications/{app}/skus")(premium._list_skus)
        r("GET", "/applications/{app}/entitlements")(premium._list_entitlements)
        r("POST", "/applications/{app}/entitlements/{entitlement}/consume")(premium._consume)

    async def _me(self, call: Call, m: re.Match[str]) -> Any:
        return p.user(p.BOT_ID, bot=True) | {"verified": True, "mfa_enabled": False, "flags": 0}

    async def _application(self, call: Call, m: re.Match[str]) -> Any:
        return {
            "id": str(p.APP_ID),
            "name": "Atelier",
            "description": "Image studio",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": p.user(p.OWNER_ID),
            "verify_key": "00" * 32,
            "flags": 0,
            "bot": p.user(p.BOT_ID, bot=True),
        }

    async def _gateway_info(self, call: Call, m: re.Match[str]) -> Any:
        return {"url": self.gateway_url}

    async def _sync(self, call: Call, m: re.Match[str]) -> Any:
        scope = m.groupdict().get("guild") or "global"
        commands = [
            {
                **c,
                "id": str(self.snowflake()),
                "application_id": str(p.APP_ID),
                "version": str(self.snowflake()),
                "type": c.get("type", 1),
                # Discord answers with the permissions as a string, whatever was sent.
                "default_member_permissions": _str_or_none(c.get("default_member_permissions")),
                **({"guild_id": scope} if scope != "global" else {}),
            }
            for c in call.json or []
        ]
        self.commands[scope] = commands
        return commands

    async def _list_commands(self, call: Call, m: re.Match[str]) -> Any:
        return self.commands.get(m.groupdict().get("guild") or "global", [])

    def _interaction(self, token: str) -> Interaction:
        found = next((i for i in self.interactions.values() if i.token == token), None)
        if found is None:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        return found

    async def _callback(self, call: Call, m: re.Match[str]) -> Any:
        inter = self.interactions.get(int(m["id"]))
        if inter is None or inter.token != m["token"]:
            raise DiscordError(404, 10062, "Unknown interaction")
        if inter.callback is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        if time.monotonic() - inter.sent_at > RESPOND_WITHIN_S:
            raise DiscordError(404, 10062, "Unknown interaction")  # answered too late
        inter.callback = call
        kind = int(call.json["type"])
        body = call.json.get("data") or {}
        message: dict[str, Any] | None = None
        if kind in (4, 5):  # a message, or "thinking..." to be edited later
            flags = int(body.get("flags") or 0) | (LOADING if kind == 5 else 0)
            message = self._store(inter.channel_id, call, body, flags=flags, interaction=inter)
            inter.original = message
        elif kind == 7:  # a component's message, updated
            message = self._update(int(inter.payload["message"]["id"]), call, body)
        elif kind == 6:
            inter.original = self.messages.get(int(inter.payload["message"]["id"]))
        result: dict[str, Any] = {
            "interaction": {
                "id": str(inter.id),
                "type": inter.type,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(
                    message is not None and int(message["flags"]) & EPHEMERAL
                ),
            },
            "resource": {"type": kind},
        }
        if message is not None:
            result["interaction"]["response_message_id"] = message["id"]
            result["resource"]["message"] = message
        return result

    def _live_token(self, token: str) -> Interaction:
        inter = self._interaction(token)
        if self.clock.time() - inter.created > TOKEN_TTL_S:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        return inter

    async def _followup(self, call: Call, m: re.Match[str]) -> Any:
        inter = self._live_token(m["token"])
        if inter.callback is None:
            raise DiscordError(404, 10015, "Unknown Webhook")
        body = call.json or {}
        return self._store(
            inter.channel_id, call, body, flags=int(body.get("flags") or 0), interaction=inter
        )

    def _webhook_message(self, m: re.Match[str]) -> tuple[Interaction, int]:
        inter = self._live_token(m["token"])
        if m["message"] == "@original":
            if inter.original is None:
                raise DiscordError(404, 10008, "Unknown Message")
            return inter, int(inter.original["id"])
        return inter, int(m["message"])

    async def _get_webhook_message(self, call: Call, m: re.Match[str]) -> Any:
        _, message_id = self._webhook_message(m)
        return self._get(message_id)

    async def _edit_webhook_message(self, call: Call, m: re.Match[str]) -> Any:
        inter, message_id = self._webhook_message(m)
        message = self._update(message_id, call, call.json or {})
        message["flags"] = int(message["flags"]) & ~LOADING
        if m["message"] == "@original":
            inter.original = message
        return message

    async def _delete_webhook_message(self, call: Call, m: re.Match[str]) -> Any:
        _, message_id = self._webhook_message(m)
        self.messages.pop(message_id, None)
        return None

    async def _channel_send(self, call: Call, m: re.Match[str]) -> Any:
        channel_id = int(m["channel"])
        if channel_id in self.dm_channels:
            if self.dm_channels[channel_id] in self.dm_closed:
                raise DiscordError(403, 50007, "Cannot send messages to this user")
        else:
            self._check_bot_may_post(channel_id, bool(call.files))
        return self._store(channel_id, call, call.json or {})

    def _check_bot_may_post(self, channel_id: int, files: bool) -> None:
        if channel_id not in self.guild.channels:
            raise DiscordError(404, 10003, "Unknown Channel")
        perms = self.guild.permissions(p.BOT_ID, channel_id)
        needed = p.SEND_MESSAGES | (p.ATTACH_FILES if files else 0)
        if perms & needed != needed:
            raise DiscordError(403, 50013, "Missing Permissions")

    async def _channel_edit(self, call: Call, m: re.Match[str]) -> Any:
        return self._update(int(m["message"]), call, call.json or {})

    async def _channel_get(self, call: Call, m: re.Match[str]) -> Any:
        return self._get(int(m["message"]))

    async def _channel_delete(self, call: Call, m: re.Match[str]) -> Any:
        self.messages.pop(int(m["message"]), None)
        return None

    def _dm_channel(self, user_id: int) -> int:
        channel_id = next((c for c, u in self.dm_channels.items() if u == user_id), None)
        if channel_id is None:
            channel_id = self.snowflake()
            self.dm_channels[channel_id] = user_id
        return channel_id

    async def _open_dm(self, call: Call, m: re.Match[str]) -> Any:
        user_id = int(call.json["recipient_id"])
        channel_id = self._dm_channel(user_id)
        return {
            "id": str(channel_id),
            "type": 1,
            "last_message_id": None,
            "recipients": [p.user(user_id)],
        }

    async def _typing(self, call: Call, m: re.Match[str]) -> Any:
        return None

    # Messages -------------------------------------------------------------------------------

    def _get(self, message_id: int) -> dict[str, Any]:
        message = self.messages.get(message_id)
        if message is None:
            raise DiscordError(404, 10008, "Unknown Message")
        return message

    def _files(self, call: Call, body: dict[str, Any], keep: list[Any]) -> list[dict[str, Any]]:
        """Attachments of a message: those kept (``attachments: [{id}]``) plus the uploads,
        each within the interaction's size limit."""
        out = list(keep)
        for upload in call.files:
            if len(upload.data) > self.attachment_size_limit:
                raise DiscordError(413, 40005, "Request entity too large")
            out.append(self.add_attachment(upload.data, upload.filename))
        return out

    def _store(
        self,
        channel_id: int,
        call: Call,
        body: dict[str, Any],
        *,
        flags: int = 0,
        interaction: Interaction | None = None,
    ) -> dict[str, Any]:
        message = p.message(
            self.snowflake(),
            channel_id,
            self.clock,
            content=body.get("content") or "",
            embeds=body.get("embeds"),
            components=body.get("components"),
            attachments=self._files(call, body, []),
            flags=flags,
            guild_id=None if channel_id in self.dm_channels else self.guild.id,
            webhook_id=p.APP_ID if interaction is not None else None,
            interaction_id=None if interaction is None else interaction.id,
        )
        message.update(p.mentions(message["content"], body.get("allowed_mentions")))
        call.pings = p.pinged(message)
        self.messages[int(message["id"])] = message
        return message

    def _update(self, message_id: int, call: Call, body: dict[str, Any]) -> dict[str, Any]:
        message = self._get(message_id)
        for key in ("content", "embeds", "components"):
            if key in body:
                empty: Any = "" if key == "content" else []
                message[key] = empty if body[key] is None else body[key]
        if "content" in body:  # Discord works the mentions out again from the new content
            message.update(p.mentions(message["content"], body.get("allowed_mentions")))
            call.pings = p.pinged(message)
        if "attachments" in body or call.files:
            kept_ids = {str(a.get("id")) for a in body.get("attachments") or []}
            kept = [a for a in message["attachments"] if a["id"] in kept_ids]
            message["attachments"] = self._files(call, body, kept)
        message["edited_timestamp"] = p.iso(self.clock.now())
        return message

    async def _wait_if_held(self, route: str) -> None:
        raise NotImplementedError

    async def _attachment(self, request: web.Request) -> web.Response:
        await self._wait_if_held("GET /attachments/{key}/{name}")
        data = self.attachments.get(request.match_info["key"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    headers = {"Content-Type": JSON, **(headers or {})}
    return web.Response(body=json.dumps(body).encode(), status=status, headers=headers)


def _error(call: Call, status: int, code: int, message: str) -> web.Response:
    call.status = status
    return _json({"code": code, "message": message}, status)


async def _parse(request: web.Request) -> tuple[Any, list[Upload]]:
    """The JSON body, or a multipart body's ``payload_json`` and ``files[N]`` parts."""
    if request.content_type == "multipart/form-data":
        payload: Any = None
        files: list[Upload] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # discord.py sends no nested multipart
            data = bytes(await part.read())
            if part.name == "payload_json":
                payload = json.loads(data)
            elif part.filename is not None:
                files.append(Upload(part.name or "", part.filename, data))
        return payload, files
    body = await request.read()
    return (json.loads(body) if body else None), []


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
