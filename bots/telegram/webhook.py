"""Webhook mode (long polling is the default): Telegram POSTs each update to us with the secret
token we gave it; anything without that token is refused, and each update_id is handled once
(Telegram retries a delivery whose answer it did not get)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from telegram import Update
from telegram.ext import Application

from bots.common.core import ChatCore
from bots.common.state import SEEN_UPDATE, SEEN_UPDATE_TTL_S
from bots.telegram.services import KEY, PLATFORM
from core.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# What Telegram accepts as a secret_token.
_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_START_TIMEOUT_S = 30.0


def check_secret(secret_token: str) -> str:
    if not _SECRET_RE.fullmatch(secret_token):
        raise ConfigError(
            "ATELIER_TELEGRAM_WEBHOOK_SECRET must be 1-256 characters of A-Z, a-z, 0-9, _ and -"
        )
    return secret_token


def webhook_path(url: str) -> str:
    """The local route: the path of the public URL (a proxy in front keeps it)."""
    return urlsplit(url).path or "/"


def webhook_app(
    application: Application,  # type: ignore[type-arg]
    *,
    secret_token: str,
    path: str = "/telegram",
) -> Starlette:
    """An ASGI app that feeds verified, first-seen updates to ``application``'s queue."""
    expected = check_secret(secret_token).encode()
    core: ChatCore = application.bot_data[KEY]

    async def receive(request: Request) -> Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, expected):
            log.warning("webhook: refused a request without the secret token")
            return Response(status_code=403)
        try:
            data: Any = await request.json()
            update_id = int(data["update_id"])
        except (ValueError, KeyError, TypeError):
            return Response(status_code=400)
        key = SEEN_UPDATE.format(platform=PLATFORM, update_id=update_id)
        if not await core.state.add(key, "1", SEEN_UPDATE_TTL_S):
            log.info("webhook: update %d delivered again; ignored", update_id)
            return Response(status_code=200)
        await application.update_queue.put(Update.de_json(data, application.bot))
        return Response(status_code=200)

    return Starlette(routes=[Route(path, receive, methods=["POST"])])


class WebhookServer:
    """Serves ``webhook_app`` with uvicorn on ``listen:port`` in the running loop. The caller
    starts the Application (the update queue's consumer) and registers the URL with Telegram."""

    def __init__(
        self,
        application: Application,  # type: ignore[type-arg]
        *,
        url: str,
        secret_token: str,
        listen: str,
        port: int,
    ) -> None:
        app = webhook_app(application, secret_token=secret_token, path=webhook_path(url))
        config = uvicorn.Config(app, host=listen, port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None
        self._address = (listen, port)
        self.where = f"{listen}:{port}{webhook_path(url)}"

    async def start(self) -> None:
        """Listen; ConfigError when the address cannot be served (in use, say)."""
        # Bound here, not by uvicorn, which would exit the process (SystemExit) on failure.
        host, port = self._address
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"the Telegram webhook cannot listen on {host}:{port} ({exc.strerror}); "
                "see ATELIER_TELEGRAM_WEBHOOK_LISTEN and ATELIER_TELEGRAM_WEBHOOK_PORT"
            ) from None
        self._task = asyncio.create_task(self._server.serve([sock]), name="telegram-webhook")
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not self._server.started:
                if self._task.done():
                    self._task = None
                    raise ConfigError(f"the Telegram webhook did not start on {self.where}")
                await asyncio.sleep(0.05)
        log.info("telegram webhook: listening on %s", self.where)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await asyncio.wait({self._task}, timeout=_START_TIMEOUT_S)
        self._task = None
