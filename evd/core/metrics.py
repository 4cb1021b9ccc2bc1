"""Prometheus metrics of one worker process (prometheus-client default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)

EVENTS_RECEIVED = Counter("evd_events_received", "Events received in POST /v1/events bodies")
EVENTS_ACCEPTED = Counter("evd_events_accepted", "Events durably appended to the raw log")
EVENTS_REJECTED = Counter(
    "evd_events_rejected", "Events rejected (per-event validation or whole request)", ["reason"]
)
EVENTS_DUPLICATES = Counter(
    "evd_events_duplicates", "Events dropped at the edge because their event_id was just seen"
)
REQUESTS = Counter("evd_http_requests", "HTTP requests answered", ["path", "status"])
REQUEST_SECONDS = Histogram(
    "evd_request_duration_seconds",
    "POST /v1/events time from the end of the body to the response (includes the fsync)",
    buckets=_LATENCY_BUCKETS,
)
LOG_FLUSH_SECONDS = Histogram(
    "evd_log_append_seconds", "Time of one group-commit flush (write + fsync)",
    buckets=_LATENCY_BUCKETS,
)
LOG_FSYNC_SECONDS = Histogram(
    "evd_log_fsync_seconds", "Time of the fsyncs of one flush", buckets=_LATENCY_BUCKETS
)
LOG_FLUSH_BYTES = Histogram(
    "evd_log_flush_bytes", "Bytes written by one group-commit flush",
    buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
)
LOG_BYTES_WRITTEN = Counter("evd_log_written_bytes", "Bytes written to log segment files")
CONNECTIONS = Gauge("evd_http_connections", "Open HTTP connections")
READY = Gauge("evd_ready", "1 when /readyz answers 200")
