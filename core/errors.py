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
    """The prompt does not fit the text encoder's window (CLIP: 77 tokens)."""

    code = "prompt_too_long"


class ImageRejected(InvalidRequest):
    """An uploaded image is not acceptable (format, size, decompression bomb, truncated)."""

    code = "image_rejected"


class UnreadableImage(ImageRejected):
    """An upload that is not a readable image at all (unknown format, corrupt, truncated):
    a smaller file would not help, another file would."""

    code = "image_unreadable"


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


class NotFound(AtelierError):
    code = "not_found"


class Forbidden(AtelierError):
    code = "forbidden"


class Conflict(AtelierError):
    """A state change that is not allowed from the current state (e.g. a used link code)."""

    code = "conflict"


class ConfigError(AtelierError):
    """Settings or deployment problem; names the variable or file at fault."""

    code = "config_error"


class DatabaseNotMigrated(ConfigError):
    code = "database_not_migrated"
