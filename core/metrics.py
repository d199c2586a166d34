"""The Prometheus metrics every Atelier process may export, defined once (names, labels,
buckets) so the dispatcher, the bots and the web app count into the same families and the
Grafana dashboard in deploy/ can rely on them. Served by ``cluster.health``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds: a job waits from ~0.1 s (an idle worker) to many minutes (a queue scaling from zero).
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

# Dispatcher: the queue and the jobs' way through it.
QUEUE_DEPTH = Gauge(
    "atelier_queue_depth", "Jobs read by this dispatcher and waiting for a worker, by the "
    "device class they need", ["device_class"],
)
BROKER_BACKLOG = Gauge(
    "atelier_broker_backlog", "Entries on the jobs stream no dispatcher has read yet",
)
JOB_WAIT = Histogram(
    "atelier_job_wait_seconds", "From submit (queued) to start on a worker",
    ["device_class"], buckets=LATENCY_BUCKETS,
)
JOB_RUN = Histogram(
    "atelier_job_run_seconds", "From start on a worker to done (images stored)",
    ["device_class"], buckets=LATENCY_BUCKETS,
)
JOB_LATENCY = Histogram(
    "atelier_job_latency_seconds", "From submit (queued) to done (images stored)",
    ["device_class"], buckets=LATENCY_BUCKETS,
)
JOBS_DONE = Counter("atelier_jobs_succeeded_total", "Jobs that succeeded", ["device_class"])
JOBS_FAILED = Counter(
    "atelier_jobs_failed_total", "Jobs failed (and refunded), by reason", ["reason"],
)
JOBS_RETRIED = Counter(
    "atelier_jobs_retried_total", "Attempts that failed and were queued again, by reason",
    ["reason"],
)
JOBS_CANCELLED = Counter("atelier_jobs_cancelled_total", "Jobs cancelled by their owner")
BATCH_SIZE = Histogram(
    "atelier_batch_size", "Jobs per batch sent to a worker", ["device_class"],
    buckets=BATCH_BUCKETS,
)
# Workers: seen from the dispatcher that runs batches on them (see cluster/health.py for why).
WORKER_BUSY = Counter(
    "atelier_worker_busy_seconds_total", "Seconds a worker spent running this dispatcher's "
    "batches; rate() of it is the worker's busy fraction", ["worker", "device_class"],
)
WORKERS = Gauge(
    "atelier_workers", "Worker actors this dispatcher knows, by class and state",
    ["device_class", "state"],
)
MODEL_LOADS = Counter(
    "atelier_model_loads_total", "Models loaded by workers", ["model", "device_class"],
)
MODEL_LOAD_TIME = Histogram(
    "atelier_model_load_seconds", "Time a worker took to load a model", ["model"],
    buckets=LOAD_BUCKETS,
)
DELIVERIES_PENDING = Gauge(
    "atelier_deliveries_pending", "Finished jobs whose front end has not confirmed delivery",
)
CREDITS_CHARGED = Counter(
    "atelier_credits_charged_total", "Credits captured for jobs that delivered",
)
CREDITS_REFUNDED = Counter(
    "atelier_credits_refunded_total", "Credits released for jobs that failed or were cancelled",
)
AUTOSCALE_WANTED = Gauge(
    "atelier_autoscale_workers_wanted", "Workers the queue needs, as last asked of Ray's "
    "autoscaler, by device class", ["device_class"],
)
# Front ends.
WEB_RATE_LIMITED = Counter(
    "atelier_web_rate_limited_total", "Web requests refused with 429, by what was over its limit",
    ["by"],
)
BOT_RATE_LIMITED = Counter(
    "atelier_bot_rate_limited_total", "429 (retry after) answers from a chat platform",
    ["platform"],
)
