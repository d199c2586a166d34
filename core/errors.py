"""The project's error hierarchy: each carries one line fit to show a person in a chat."""

from __future__ import annotations


class AtelierError(Exception):
    """Base error. ``message`` is a single line a front end may show as it is."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message.replace("\n", " ").strip()

    def __str__(self) -> str:
        return self.message


class InvalidRequest(AtelierError):
    """The request itself is wrong: a bad flag, size, count, style name..."""

    code = "invalid_request"


class PromptTooLong(InvalidRequest):
    """The prompt does not fit the text encoder's window (CLIP: 77 tokens), or has more
    characters than the deployment takes (``Limits.max_prompt_chars``)."""

    code = "prompt_too_long"


class ImageRejected(InvalidRequest):
    """An uploaded image is not acceptable (format, size, decompression bomb, truncated)."""

    code = "image_rejected"


class UnreadableImage(ImageRejected):
    """An upload that is not a readable image at all (unknown format, corrupt, truncated):
    a smaller file would not help, another file would. Same code as its parent: callers
    that sort errors by code (the dispatcher's "not worth retrying") see no new one."""


class ContentBlocked(AtelierError):
    """The prompt matches the blocklist for this channel."""

    code = "content_blocked"


class InsufficientCredits(AtelierError):
    """The account cannot pay for the job."""

    code = "insufficient_credits"

    def __init__(self, message: str, *, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class RateLimited(AtelierError):
    """Too many requests or too many jobs in flight for the tier."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyJobs(RateLimited):
    """The account already has as many jobs queued or running as its tier allows; one ending
    frees a slot (``retry_after``: a hint, in seconds)."""

    code = "too_many_jobs"


class NotFound(AtelierError):
    code = "not_found"


class Forbidden(AtelierError):
    code = "forbidden"


class AccountBlocked(Forbidden):
    """An operator blocked the account (`atelier account block`): nothing new is admitted or
    sold to it. ``reason`` is the operator's, shown to the person."""

    code = "account_blocked"

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class Conflict(AtelierError):
    """A state change that is not allowed from the current state (e.g. a used link code)."""

    code = "conflict"


class ModelUnavailable(AtelierError):
    """A model cannot be loaded where it would run, and retrying will not change that: its
    files are missing, it is not in the Hugging Face cache offline, it is not a pipeline of its
    family. ``message`` says how to get it and never holds a server path (a person may see it);
    ``detail`` is the operator's version (paths, library errors) for the log. Raised at submit
    (nothing charged) and by a worker's load (the job fails at once, not retried)."""

    code = "model_unavailable"

    def __init__(self, message: str, *, detail: str | None = None, model: str | None = None
                 ) -> None:
        super().__init__(message)
        self.detail = detail or self.message
        self.model = model

    def __reduce__(self) -> tuple[object, ...]:  # keeps detail and model across processes
        return (_rebuild_model_unavailable, (self.message, self.detail, self.model))


def _rebuild_model_unavailable(message: str, detail: str, model: str | None) -> ModelUnavailable:
    return ModelUnavailable(message, detail=detail, model=model)


class ConfigError(AtelierError):
    """Settings or deployment problem; names the variable or file at fault."""

    code = "config_error"


class DatabaseNotMigrated(ConfigError):
    code = "database_not_migrated"


class Unauthorized(AtelierError):
    """No credentials, or credentials that are wrong, revoked or malformed (HTTP 401)."""

    code = "unauthorized"
