"""The web app's one map from errors to HTTP: the status of each project error and the one
shape of every error body, ``{"error": code, "detail": text, "field"?}``, also for what
escapes a route (a body that does not parse, an unknown path, a wrong method)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from core.errors import (
    AtelierError,
    Conflict,
    ContentBlocked,
    Forbidden,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
)

STATUS: list[tuple[type[AtelierError], int]] = [
    (Unauthorized, 401),
    (InsufficientCredits, 402),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (ContentBlocked, 422),
    (InvalidRequest, 422),
    (RateLimited, 429),
]
# The code of an HTTP error raised by the framework itself (no project error behind it).
_HTTP_CODES = {
    400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "invalid_request",
    429: "rate_limited", 503: "unavailable",
}


class ErrorBody(BaseModel):
    """Every error's body (for the OpenAPI docs)."""

    error: str
    detail: str
    field: str | None = None


# The API routers' documented errors (``APIRouter(responses=ERROR_RESPONSES)``).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "unauthorized: no API key, or a wrong or revoked one"},
    402: {"model": ErrorBody, "description": "insufficient_credits"},
    404: {"model": ErrorBody, "description": "not_found (another account's job or image too)"},
    422: {"model": ErrorBody, "description": "invalid_request; field names the bad one"},
    429: {
        "model": ErrorBody,
        "description": "rate_limited (calls per window), or too_many_jobs (the tier's jobs "
                       "queued or running at a time: see GET /api/v1/account)",
        "headers": {"Retry-After": {"description": "seconds to wait before trying again",
                                    "schema": {"type": "integer"}}},
    },
}
# What pydantic puts before a validator's own message.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


class FieldError(InvalidRequest):
    """A request field that is wrong or cannot be honoured; ``field`` names it and the message
    starts with it, once: ``FieldError("prompt", "prompt must not be empty")`` says
    ``prompt: must not be empty``."""

    def __init__(self, field: str, message: str) -> None:
        for prefix in (f"{field}: ", f"{field} "):
            message = message.removeprefix(prefix)
        super().__init__(f"{field}: {message}")
        self.field = field


def status_of(exc: AtelierError) -> int:
    """The HTTP status of a project error (400 for one the map does not know)."""
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 400)


# For errors raised past the translation (the client's model, style and prompt checks), whose
# message names the value but not the field: the first word that names one.
_FIELD_WORDS = (
    ("steps", "steps"), ("width", "width"), ("height", "height"), ("style", "styles"),
    ("model", "model"), ("prompt", "prompt"), ("token", "prompt"), ("strength", "strength"),
    ("count", "count"),
)


def _guessed_field(message: str) -> str | None:
    words = set(message.lower().replace(",", " ").replace(";", " ").split())
    for word, field in _FIELD_WORDS:
        if word in words or word + "s" in words:
            return field
    return None


def error_body(exc: AtelierError, names: dict[str, str] | None = None) -> dict[str, Any]:
    """``{"error", "detail", "field"?}``; ``names`` maps our field names to the API's."""
    body: dict[str, Any] = {"error": exc.code, "detail": exc.message}
    field = getattr(exc, "field", None)
    if field is None and isinstance(exc, InvalidRequest):
        head = exc.message.split(": ", 1)[0] if ": " in exc.message else ""
        if head and head.replace(".", "").replace("_", "").isalnum():
            field = head
        else:
            guessed = _guessed_field(exc.message)
            field = (names or {}).get(guessed, guessed) if guessed else None
    if field is not None:
        body["field"] = field
    return body


def error_response(
    exc: AtelierError, *, basic_realm: bool = False, names: dict[str, str] | None = None
) -> JSONResponse:
    status = status_of(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="atelier"' if basic_realm else "Bearer"
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return JSONResponse(error_body(exc, names), status_code=status, headers=headers)


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first problem FastAPI found in a request, as our error: a body that is not JSON
    says so (pydantic's location there is a byte offset, not a field)."""
    errors = exc.errors()
    err: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if err.get("type") == "json_invalid":
        why = str((err.get("ctx") or {}).get("error", "")).strip()
        offset = next((p for p in err.get("loc", ()) if isinstance(p, int)), None)
        where = f" at byte {offset}" if offset is not None else ""
        return InvalidRequest(f"the body is not valid JSON ({why or 'unreadable'}{where})")
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header", "path")]
    message = str(err.get("msg", "invalid"))
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    if not loc:
        if err.get("type") == "missing":
            return InvalidRequest("the request needs a JSON body")
        return InvalidRequest(f"the body is not valid: {message}")
    return FieldError(".".join(loc), message)


def http_error_body(status: int, detail: Any) -> dict[str, Any]:
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    return {"error": _HTTP_CODES.get(status, "error"), "detail": text}


def install(app: FastAPI) -> None:
    """The app's handlers for what a route class did not answer itself, in the one shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(
            http_error_body(exc.status_code, exc.detail), status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(AtelierError)
    async def _ours(request: Request, exc: AtelierError) -> Response:
        return error_response(exc)
