"""Keep bot tokens out of every log record: messages, arguments and formatted tracebacks."""

from __future__ import annotations

import logging
from typing import Any

_SECRETS: set[str] = set()
MASK = "<token>"


def hide_in_logs(secret: str) -> None:
    """Mask ``secret`` in all log records from now on (process-wide, as logging is).

    httpx logs each request URL (which holds a Telegram token) at INFO: it is raised to
    WARNING. Everything else that names the secret is masked when the record is made.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not secret:
        return
    if not _SECRETS:
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _redact(record)
            return record

        logging.setLogRecordFactory(factory)
    _SECRETS.add(secret)


def mask(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, MASK)
    return text


def _redact(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to logging's own error report
        return
    masked = mask(message)
    if masked != message:
        record.msg, record.args = masked, None
    if record.exc_info and record.exc_info[0] is not None:
        # Formatters reuse exc_text when set: format the traceback once, masked.
        text = logging.Formatter().formatException(record.exc_info)
        record.exc_text = mask(text)
    if record.stack_info:
        record.stack_info = mask(record.stack_info)
