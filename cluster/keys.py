"""Every Redis key, stream, group and channel name Atelier uses, each with its retention.

Names built from a value validate it first, so no user input can shape a key.
"""

from __future__ import annotations

import re

from core.errors import InvalidRequest

PREFIX = "atelier"

# Jobs accepted by the client, read by the dispatchers' consumer group. Retention: an entry stays
# until every group has acked it, then JobQueue.trim() drops it (XTRIM MINID to the oldest
# un-acked entry). The database is the record of a job; this Redis keeps nothing on disk, so after a
# restart the dispatcher notices the new server_epoch() and re-enqueues unfinished jobs from it.
JOBS_STREAM = f"{PREFIX}:jobs"
DISPATCHER_GROUP = "dispatchers"

# Jobs that failed max_deliveries times, for people to look at. Retention: capped at about
# DEAD_LETTER_MAXLEN entries (XADD MAXLEN ~); the job row in the database keeps the failure too.
DEAD_LETTER_STREAM = f"{PREFIX}:jobs:dead"
DEAD_LETTER_MAXLEN = 10_000

# Finished-job events for one front end, read by that front end's own group.
# Retention: like JOBS_STREAM, kept until acked by the group, then trimmed by Deliveries.trim().
DELIVERIES_PREFIX = f"{PREFIX}:deliveries:"

# Progress ticks: pub/sub channels, nothing retained (a subscriber that is not listening misses
# them; they are best effort by design).
PROGRESS_PREFIX = f"{PREFIX}:progress:"

# Cancellation flags, set by the client, polled by the dispatcher and workers.
# Retention: a TTL (default CANCEL_TTL_S), long enough to outlive any queued or running job.
CANCEL_PREFIX = f"{PREFIX}:cancel:"
CANCEL_TTL_S = 3600

# Re-announcement claims: one dispatcher re-announces an undelivered job per back-off period.
# Retention: a TTL of that period.
REDELIVER_PREFIX = f"{PREFIX}:redeliver:"

# The models a worker can load (its node's files and Hugging Face cache), published for it by the
# dispatchers that see it, read by submit (a job for a model no live worker can load is refused).
# Retention: a TTL of a few refresh periods (WORKER_MODELS_TTL_S), so a gone worker's key lapses.
WORKER_MODELS_PREFIX = f"{PREFIX}:worker-models:"
WORKER_MODELS_TTL_S = 60.0

# Each dispatcher's view of the queue per device class (queued jobs, busy workers, seconds of
# queued work), summed by every dispatcher into the one request it makes of Ray's autoscaler
# (which keeps only the last request made). Retention: a TTL of a few autoscale intervals
# (DEMAND_TTL_S at least), so a gone dispatcher's demand lapses; deleted on a clean stop.
DEMAND_PREFIX = f"{PREFIX}:demand:"
DEMAND_TTL_S = 30.0

# The web app's request counters for rate limits (web/ratelimit.py's RedisRateCounter; per API
# key, per client address), one per fixed window. Retention: a TTL of the window (plus 1 s),
# set by the first hit.
RATE_PREFIX = f"{PREFIX}:rate:"
RATE_BUCKET_RE = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,128}$")

# The bots' own small state (bots/common/state.py: Redis when configured, else in-process).
# Each with its retention.
BOT_PREFIX = f"{PREFIX}:bot"
# Personal preferences (JSON): kept until changed, no TTL.
BOT_PREFS = BOT_PREFIX + ":{platform}:prefs:{user}"
# A group's settings (JSON, set by its admins): kept until changed, no TTL.
BOT_GROUP = BOT_PREFIX + ":{platform}:group:{chat}"
# A finished job was posted: TTL BOT_DELIVERED_TTL_S, longer than any redelivery can come late.
BOT_DELIVERED = BOT_PREFIX + ":{platform}:delivered:{job}"
BOT_DELIVERED_TTL_S = 7 * 24 * 3600
# One part of a result (a photo, an album) was posted: a delivery retried after flood control
# or a restart skips it. TTL BOT_POSTED_TTL_S (the delivered marker takes over once all are out).
BOT_POSTED = BOT_PREFIX + ":{platform}:posted:{job}:{part}"
BOT_POSTED_TTL_S = 24 * 3600
# The same marks in the bot process's memory (Posted.here): long enough for a delivery's
# retries and the re-announcement of a job whose marks the state lost.
BOT_POSTED_HERE_TTL_S = 3600
# An album of photos was answered (only its captioned photo is used): TTL BOT_ALBUM_SEEN_TTL_S,
# longer than Telegram takes to deliver one album's messages.
BOT_ALBUM_SEEN = BOT_PREFIX + ":{platform}:album:{album}"
BOT_ALBUM_SEEN_TTL_S = 3600
# Plain text shown as a preview, waiting for its Imagine button: TTL BOT_DRAFT_TTL_S.
BOT_DRAFT = BOT_PREFIX + ":{platform}:draft:{chat}:{draft}"
BOT_DRAFT_TTL_S = 24 * 3600
# A webhook update already handled: TTL BOT_SEEN_UPDATE_TTL_S (Telegram retries for ~hours).
BOT_SEEN_UPDATE = BOT_PREFIX + ":{platform}:update:{update_id}"
BOT_SEEN_UPDATE_TTL_S = 24 * 3600
# A Discord message reachable through its interaction's webhook: JSON {token, created, limit};
# TTL the token's life (BOT_HOOK_TTL_S, 15 min), after which Discord refuses the token anyway.
BOT_HOOK = BOT_PREFIX + ":discord:hook:{message}"
BOT_HOOK_TTL_S = 15 * 60

FRONTEND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Job ids are made by the store (uuid/ulid/integer), never by a person; still checked, since they
# end up in key names.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CONSUMER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def check_frontend(frontend: str) -> str:
    """Return ``frontend`` if it is a valid front-end name, else raise InvalidRequest."""
    if not isinstance(frontend, str) or not FRONTEND_RE.fullmatch(frontend):
        raise InvalidRequest(f"front end name must match {FRONTEND_RE.pattern}, got {frontend!r}")
    return frontend


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is safe inside a key name, else raise InvalidRequest."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InvalidRequest(f"job id must match {JOB_ID_RE.pattern}, got {job_id!r}")
    return job_id


def check_consumer(consumer: str) -> str:
    """Return ``consumer`` if it is a valid consumer (or dispatcher) name, else raise."""
    if not isinstance(consumer, str) or not CONSUMER_RE.fullmatch(consumer):
        raise InvalidRequest(f"consumer name must match {CONSUMER_RE.pattern}, got {consumer!r}")
    return consumer


def deliveries_stream(frontend: str) -> str:
    """``atelier:deliveries:{frontend}``: finished-job events for one front end."""
    return DELIVERIES_PREFIX + check_frontend(frontend)


def delivery_group(frontend: str) -> str:
    """The consumer group a front end reads its deliveries stream with: named after it."""
    return check_frontend(frontend)


def progress_channel(job_id: str) -> str:
    """``atelier:progress:{job_id}``: pub/sub channel of a job's progress ticks."""
    return PROGRESS_PREFIX + check_job_id(job_id)


def cancel_key(job_id: str) -> str:
    """``atelier:cancel:{job_id}``: present (with a TTL) once cancellation was asked for."""
    return CANCEL_PREFIX + check_job_id(job_id)


def redeliver_key(job_id: str) -> str:
    """``atelier:redeliver:{job_id}``: present (with a TTL) while one dispatcher's
    re-announcement of the job stands for all."""
    return REDELIVER_PREFIX + check_job_id(job_id)


def rate_key(bucket: str, window: int) -> str:
    """``atelier:rate:{bucket}:{window}``: hits on ``bucket`` in fixed window number ``window``."""
    if not RATE_BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"invalid rate bucket {bucket!r}")
    return f"{RATE_PREFIX}{bucket}:{window}"


def demand_key(dispatcher: str) -> str:
    """``atelier:demand:{dispatcher}``: one dispatcher's queue demand (JSON), with a TTL."""
    return DEMAND_PREFIX + check_consumer(dispatcher)


def worker_models_key(worker_id: str) -> str:
    """``atelier:worker-models:{worker_id}``: the models a worker can load, with a TTL."""
    return WORKER_MODELS_PREFIX + check_consumer(worker_id)
