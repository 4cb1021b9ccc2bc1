"""The processors' metrics: events taken in, dropped, late, sessions, charts, lag."""

from __future__ import annotations

from evd.core.metrics.kinds import Counter, CounterVec, Labels, WorkerGauge

__all__ = [
    "BUFFERED_EVENTS",
    "CHART_ROWS",
    "KEPT_SESSIONS",
    "LATE_BUFFER_FULL",
    "LATE_LATENESS",
    "OPEN_SESSIONS",
    "PROCESSED",
    "PROCESSOR_DUPLICATES",
    "PROCESSOR_FORCED",
    "PROCESSOR_LAG_BYTES",
    "PROCESSOR_LAG_SECONDS",
    "PROCESSOR_LATE",
    "SESSIONS_CLOSED",
    "SNAPSHOTS",
]

PROCESSED = Counter("evd_processor_events", "Raw events the processors took in (duplicates too)")
PROCESSOR_DUPLICATES = Counter(
    "evd_processor_duplicates", "Events dropped by the processors' dedup window"
)
_REASONS = Labels("reason", 2)
_REASONS.set(("lateness", "buffer_full"))
#: Why an event was late (indexes of PROCESSOR_LATE): older than the watermark
#: minus the allowed lateness; or only because the ordering buffer's bound forced
#: the watermark past it.
LATE_LATENESS, LATE_BUFFER_FULL = 0, 1
PROCESSOR_LATE = CounterVec(
    "evd_processor_late",
    "Events that missed sessions and charts (late stream), by reason",
    _REASONS,
)
PROCESSOR_FORCED = Counter(
    "evd_processor_forced",
    "Events released before the watermark passed them (ordering buffer full)",
)
SESSIONS_CLOSED = Counter(
    "evd_sessions_closed", "Sessions emitted (closed ones, revisions and retractions)"
)
CHART_ROWS = Counter(
    "evd_chart_rows", "Chart rows emitted for closed windows (and their revisions)"
)
SNAPSHOTS = Counter("evd_snapshots", "Processor snapshots written")
PROCESSOR_LAG_BYTES = WorkerGauge(
    "evd_processor_lag_bytes", "Raw log bytes the worker's processors have not read", "sum"
)
PROCESSOR_LAG_SECONDS = WorkerGauge(
    "evd_processor_lag_seconds",
    "Age of the oldest raw record the worker's processors have not read", "max",
)
OPEN_SESSIONS = WorkerGauge("evd_open_sessions", "Sessions open in the processors", "sum")
KEPT_SESSIONS = WorkerGauge(
    "evd_kept_sessions",
    "Emitted sessions the processors keep for late events (the allowed lateness)",
    "sum",
)
BUFFERED_EVENTS = WorkerGauge(
    "evd_processor_buffered_events", "Events waiting for the watermark", "sum"
)
