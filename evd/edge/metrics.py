"""The edge's metrics: events received, accepted and rejected, HTTP requests, connections."""

from __future__ import annotations

from http import HTTPStatus

from evd.core.metrics.kinds import (
    LATENCY_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    LabelledCounter,
    RequestCounter,
)

__all__ = [
    "ACCEPTED",
    "CONNECTIONS",
    "DUPLICATES",
    "PATHS",
    "RECEIVED",
    "REJECTED",
    "REJECT_REASONS",
    "REQUESTS",
    "REQUEST_SECONDS",
    "STATUSES",
]

#: ``evd_events_rejected_total{reason}``: every reason ingest counts.
REJECT_REASONS = ("invalid", "too_many_events", "rate_limited", "overloaded", "log_unavailable")
#: ``evd_http_requests_total{path}``: the server's path labels (server._PATH_LABELS) and "other".
PATHS = ("/v1/events", "/healthz", "/readyz", "/metrics", "/v1/charts/top-tracks", "other")
#: ``evd_http_requests_total{status}``: every status the edge can render (http.render).
STATUSES = tuple(sorted(s.value for s in HTTPStatus))

RECEIVED = Counter(
    "evd_events_received", "Events received in POST /v1/events bodies",
    per_worker=("evd_worker_events_received", "Events the worker received"),
)
ACCEPTED = Counter("evd_events_accepted", "Events durably appended to the raw log")
DUPLICATES = Counter(
    "evd_events_duplicates", "Events dropped at the edge because their event_id was just seen"
)
REJECTED = LabelledCounter(
    "evd_events_rejected", "Events rejected (per-event validation or whole request)",
    "reason", REJECT_REASONS,
)
REQUESTS = RequestCounter(
    "evd_http_requests", "HTTP requests answered", PATHS, STATUSES,
    per_worker=("evd_worker_requests", "HTTP requests the worker answered"),
)
REQUEST_SECONDS = Histogram(
    "evd_request_duration_seconds",
    "POST /v1/events time from the end of the body to the response (includes the fsync)",
    LATENCY_BUCKETS,
)
CONNECTIONS = Gauge("evd_http_connections", "Open HTTP connections")
