"""A fake Discord (REST v10 + gateway v10 on one 127.0.0.1 port, aiohttp) that the real
discord.py talks to in tests and benches: it serves one guild, pushes interactions over the gateway,
enforces the 3-second and 15-minute interaction rules on its own movable clock, parses uploads,
serves attachments, answers 429s or holds calls on request, works out who each message pings
(from its ``allowed_mentions``) and records every REST call."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from testing.discord import payloads as p
from testing.discord.premium import Premium
from testing.discord.rest import (
    JSON,
    Call,
    DiscordError,
    DiscordRest,
    Handler,
    Interaction,
    Upload,
    _error,
    _json,
    _parse,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


__all__ = ["JSON", "TOKEN", "Call", "DiscordError", "FakeDiscord", "Interaction", "Upload"]

TOKEN = "ODk0NTY3ODkwMTIzNDU2Nzg5.fake.discord-bot-token-for-tests"
DEFAULT_SIZE_LIMIT = 10 * 1024 * 1024


class FakeDiscord(DiscordRest, Premium):
    """One application, one guild; ``start()``, then point discord.py at ``api_base`` and
    ``gateway_url``."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.port = free_port()
        self.clock = p.Clock()
        self.snowflake = p.Snowflakes(self.clock)
        self.guild = p.Guild()
        self.calls: list[Call] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.attachments: dict[str, bytes] = {}
        self.interactions: dict[int, Interaction] = {}
        self.dm_channels: dict[int, int] = {}  # channel id -> user id
        self.dm_closed: set[int] = set()  # users who do not accept DMs from the bot
        self.attachment_size_limit = DEFAULT_SIZE_LIMIT
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" / guild id -> commands
        self.identifies = 0
        self.skus: dict[int, dict[str, Any]] = {}
        self.entitlements: dict[int, dict[str, Any]] = {}
        self._failures: list[tuple[str | None, float]] = []
        self._holds: list[tuple[str, asyncio.Event]] = []
        self._sockets: set[web.WebSocketResponse] = set()
        self._seq = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._routes: list[tuple[str, re.Pattern[str], str, Handler]] = []
        self._add_routes()

    # Lifecycle ------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{key}/{name}", self._attachment)
        app.router.add_route("*", "/api/v10/{path:.*}", self._api)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # What tests do --------------------------------------------------------------------------

    def fail(self, times: int, *, retry_after: float = 0.5, route: str | None = None) -> None:
        """Answer the next ``times`` REST calls (whose route contains ``route``) with a 429."""
        self._failures.extend([(route, retry_after)] * times)

    def hold(self, route: str) -> asyncio.Event:
        """Keep the REST calls whose route contains ``route`` (``GET /attachments`` for
        downloads) unanswered, though received and recorded, until the event returned is
        set: lines up what the bot does meanwhile."""
        gate = asyncio.Event()
        self._holds.append((route, gate))
        return gate

    async def _wait_if_held(self, route: str) -> None:
        gate = next((g for r, g in self._holds if r in route and not g.is_set()), None)
        if gate is not None:
            await self.notify()
            await gate.wait()

    def add_attachment(self, data: bytes, filename: str = "photo.png") -> dict[str, Any]:
        """An attachment (as in ``data.resolved``) the bot can download."""
        key = secrets.token_hex(6)
        self.attachments[key] = data
        url = f"{self.base}/attachments/{key}/{filename}"
        return {
            "id": str(self.snowflake()),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": "image/png" if filename.endswith(".png") else "image/jpeg",
            "width": 64,
            "height": 64,
        }

    async def slash(
        self,
        user: int,
        name: str,
        options: list[dict[str, Any]] | None = None,
        *,
        channel: int = p.PLAIN_CHANNEL,
        attachments: list[dict[str, Any]] | None = None,
        autocomplete: bool = False,
        interaction_id: int | None = None,
        token: str | None = None,
    ) -> Interaction:
        """A person runs ``/name`` with ``options`` (``p.option(...)``); ``attachments`` go to
        ``data.resolved`` (an attachment option's value is the attachment's id). With
        ``interaction_id``/``token``, the same interaction is delivered again."""
        data: dict[str, Any] = {
            "id": str(self._command_id(name)),
            "name": name,
            "type": 1,
            "options": options or [],
        }
        if attachments:
            data["resolved"] = {"attachments": {a["id"]: a for a in attachments}}
        kind = 4 if autocomplete else 2
        return await self._interact(
            kind, user, channel, data, interaction_id=interaction_id, token=token
        )

    async def click(
        self, user: int, message: dict[str, Any], custom_id: str, *, channel: int | None = None
    ) -> Interaction:
        """A person presses the button ``custom_id`` on a message the bot sent."""
        data = {"custom_id": custom_id, "component_type": 2}
        channel_id = channel or int(message["channel_id"])
        if channel_id in self.dm_channels:
            channel_id = p.DM
        return await self._interact(3, user, channel_id, data, message=message)

    async def _interact(
        self,
        kind: int,
        user: int,
        channel_id: int,
        data: dict[str, Any],
        *,
        message: dict[str, Any] | None = None,
        interaction_id: int | None = None,
        token: str | None = None,
    ) -> Interaction:
        iid = interaction_id or self.snowflake()
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(p.APP_ID),
            "type": kind,
            "token": token or f"itok-{secrets.token_urlsafe(24)}",
            "version": 1,
            "attachment_size_limit": self.attachment_size_limit,
            "locale": "en-US",
            "channel_id": str(channel_id),
            "entitlements": [],
            "data": data,
        }
        if channel_id == p.DM:  # the person's DM with the bot
            dm = self._dm_channel(user)
            payload.update(
                channel_id=str(dm),
                channel={"id": str(dm), "type": 1, "recipients": [p.user(user)]},
                user=p.user(user),
                app_permissions=str(p.BOT_PERMS),
                authorizing_integration_owners={"1": str(user)},
                context=1,
            )
            channel_id = dm
        else:
            channel = self.guild.channels[channel_id]
            perms = self.guild.permissions(user, channel_id)
            payload.update(
                guild_id=str(self.guild.id),
                guild_locale="en-US",
                channel={**channel.payload(), "permissions": str(perms)},
                member=self.guild.member(user, self.clock, permissions=str(perms)),
                app_permissions=str(self.guild.permissions(p.BOT_ID, channel_id)),
                authorizing_integration_owners={"0": str(self.guild.id)},
                context=0,
            )
        if message is not None:
            payload["message"] = message
        record = Interaction(
            iid, payload["token"], kind, user, channel_id, payload, self.clock.time()
        )
        self.interactions.setdefault(iid, record)
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a gateway event to every connected bot."""
        frame = {"op": 0, "t": event, "s": next(self._seq), "d": data}
        for ws in list(self._sockets):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(frame))

    def calls_to(self, route: str, *, ok: bool | None = True) -> list[Call]:
        """Calls whose route contains ``route`` (e.g. ``"/channels/{id}/messages"``)."""
        return [c for c in self.calls if route in c.route and (ok is None or c.ok is ok)]

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition"
    ) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every request); return it."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not (result := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    last = [f"{c.route} {c.status}" for c in self.calls[-12:]]
                    raise AssertionError(f"timed out waiting for {what}; last calls: {last}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return result

    async def wait_call(self, route: str, n: int = 1, timeout: float = 60.0) -> Call:
        """The ``n``-th successful call to ``route``, waiting for it."""
        await self.wait_for(lambda: len(self.calls_to(route)) >= n, timeout, f"{n} x {route}")
        return self.calls_to(route)[n - 1]

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _command_id(self, name: str) -> int:
        for commands in self.commands.values():
            for command in commands:
                if command.get("name") == name:
                    return int(command["id"])
        return self.snowflake()

    # Gateway --------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41_250}}))
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if frame.get("op") == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif frame.get("op") == 2:
                    await self._ready(ws, frame["d"])
        finally:
            self._sockets.discard(ws)
        return ws

    async def _ready(self, ws: web.WebSocketResponse, identify: dict[str, Any]) -> None:
        if identify.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identifies += 1
        ready = {
            "v": 10,
            "user": p.user(p.BOT_ID, bot=True),
            "session_id": secrets.token_hex(16),
            "resume_gateway_url": self.gateway_url,
            "guilds": [{"id": str(self.guild.id), "unavailable": True}],
            "application": {"id": str(p.APP_ID), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }
        for event, data in (("READY", ready), ("GUILD_CREATE", self.guild.payload(self.clock))):
            frame = {"op": 0, "t": event, "s": next(self._seq), "d": data}
            await ws.send_str(json.dumps(frame))
        await self.notify()

    # REST -----------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        call = Call(request.method, path, query=dict(request.query))
        call.json, call.files = await _parse(request)
        self.calls.append(call)
        try:
            return await self._answer(request, call, path)
        finally:
            await self.notify()

    async def _answer(self, request: web.Request, call: Call, path: str) -> web.Response:
        found = next(
            (
                (route, handler, match)
                for method, pattern, route, handler in self._routes
                if method == request.method and (match := pattern.match(path)) is not None
            ),
            None,
        )
        if found is None:
            call.route = f"{request.method} {path} (not faked)"
            return _error(call, 404, 0, call.route)
        route, handler, match = found
        call.route = route
        await self._wait_if_held(route)
        if request.headers.get("Authorization") not in (f"Bot {self.token}", None):
            return _error(call, 401, 0, "401: Unauthorized")
        failure = next((f for f in self._failures if f[0] is None or f[0] in route), None)
        if failure is not None:
            self._failures.remove(failure)
            call.status = 429
            body = {"message": "You are being rate limited.", "retry_after": failure[1]}
            headers = {
                "Via": "1.1 google",  # discord.py treats a 429 without it as a Cloudflare ban
                "Retry-After": str(max(1, round(failure[1]))),
                "X-RateLimit-Scope": "user",
            }
            return _json(body | {"global": False}, 429, headers)
        try:
            result = await handler(call, match)
        except DiscordError as exc:
            return _error(call, exc.status, exc.code, exc.message)
        call.result = result
        if result is None:
            call.status = 204
            return web.Response(status=204)
        return _json(result)

