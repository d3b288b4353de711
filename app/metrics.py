"""Prometheus metrics. Each process serves its own registry: the API at `/metrics` (requests,
open websockets, and job counts and queue depth read from PostgreSQL on each scrape); a worker on
`FERRY_WORKER_METRICS_PORT` when set (jobs finished, durations, rows and bytes moved)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "ferry_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "ferry_http_request_duration_seconds", "HTTP request latency by route", ["method", "route"]
)
JOBS_SUBMITTED = Counter("ferry_jobs_submitted_total", "Jobs accepted", ["kind"])
JOBS_FINISHED = Counter("ferry_jobs_finished_total", "Jobs finished", ["kind", "status"])
JOB_SECONDS = Histogram(
    "ferry_job_duration_seconds",
    "Job attempt duration",
    ["kind"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
ROWS_MOVED = Counter("ferry_rows_total", "Rows moved", ["kind"])
BYTES_MOVED = Counter("ferry_bytes_total", "Bytes moved", ["kind"])
JOBS = Gauge(
    "ferry_jobs", "Jobs by kind and status (PostgreSQL), sampled on scrape", ["kind", "status"]
)
QUEUE_DEPTH = Gauge("ferry_queue_depth", "Jobs queued (PostgreSQL), sampled on scrape")
OPEN_WEBSOCKETS = Gauge("ferry_open_websockets", "Open websocket connections")
