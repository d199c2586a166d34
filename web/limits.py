"""The web app's request body limit: an ASGI middleware that answers 413 with a JSON error
before a too-large body is read (its Content-Length says so) or as soon as a streamed one
passes the limit, so no route ever holds (or parses) more than ``max_bytes``."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ENV_NAME = "ATELIER_WEB_MAX_BODY_BYTES"


class _BodyTooLarge(Exception):
    """Raised out of ``receive`` into the app once the limit is passed."""


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def too_large_body(limit: int, got: int, *, declared: bool) -> bytes:
    """The 413's JSON: ``{"error": "body_too_large", "detail": ...}``."""
    size = f"{got} bytes" if declared else f"more than {limit} bytes"
    detail = (
        f"the request body is {size}; the limit is {limit} bytes ({_megabytes(limit)}, "
        f"{ENV_NAME})"
    )
    return json.dumps({"error": "body_too_large", "detail": detail}).encode()


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one itself
    return None


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413: at once on a Content-Length over
    it (nothing read), else when the bytes received pass it (reading stops there; whatever
    the app answers to its cut-off body is replaced by the 413)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, too_large_body(limit, declared, declared=True))
            return

        seen = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal seen, over
            if over:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to a cut-off body: ours goes out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _refuse(send, too_large_body(limit, seen, declared=False))


async def _refuse(send: Send, body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": body})
