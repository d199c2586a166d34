"""Log set-up for every process: plain text, or one JSON object a line when
ATELIER_LOG_FORMAT=json, each carrying the job id(s) being worked on (a context variable set
around the work on a job, so every log call inside it is tagged without passing ids around)."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

JOB_IDS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "atelier_job_ids", default=()
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "job_id"}


@contextlib.contextmanager
def job_context(job_ids: str | Iterable[str]) -> Iterator[None]:
    """Tag every log line inside the block (and tasks started in it) with these job ids."""
    ids = (job_ids,) if isinstance(job_ids, str) else tuple(job_ids)
    token = JOB_IDS.set(ids)
    try:
        yield
    finally:
        JOB_IDS.reset(token)


def set_job(job_ids: str | Iterable[str]) -> None:
    """Tag the rest of the current task (asyncio copies the context per task)."""
    JOB_IDS.set((job_ids,) if isinstance(job_ids, str) else tuple(job_ids))


class JobFilter(logging.Filter):
    """Puts ``job_id`` (one id, or ids joined by commas; "" when none) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = ",".join(JOB_IDS.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, job_id (when there is one), exc, and
    any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or ",".join(JOB_IDS.get())
        if job_id:
            out["job_id"] = job_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Configure the root logger once per process (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
