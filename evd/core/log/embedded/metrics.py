"""The embedded log's metrics: flushes, fsyncs, bytes written, retention, disk use."""

from __future__ import annotations

from evd.core.metrics.kinds import LATENCY_BUCKETS, Counter, Histogram, WorkerGauge

__all__ = [
    "FLUSH_BYTES_BUCKETS",
    "LOG_BYTES_WRITTEN",
    "LOG_DISK_BYTES",
    "LOG_FLUSH_BYTES",
    "LOG_FLUSH_SECONDS",
    "LOG_FSYNC_SECONDS",
    "LOG_RETENTION_BYTES",
]

FLUSH_BYTES_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8)

LOG_FLUSH_SECONDS = Histogram(
    "evd_log_append_seconds", "Time of one group-commit flush (write + fsync)", LATENCY_BUCKETS
)
LOG_FSYNC_SECONDS = Histogram(
    "evd_log_fsync_seconds", "Time of the fsyncs of one flush or checkpoint", LATENCY_BUCKETS
)
LOG_FLUSH_BYTES = Histogram(
    "evd_log_flush_bytes", "Bytes written by one group-commit flush", FLUSH_BYTES_BUCKETS
)
LOG_BYTES_WRITTEN = Counter("evd_log_written_bytes", "Bytes written to log segment files")
LOG_RETENTION_BYTES = Counter(
    "evd_log_retention_freed_bytes", "Bytes of log segments deleted by retention"
)
LOG_DISK_BYTES = WorkerGauge(
    "evd_log_disk_bytes", "Bytes the whole log uses on disk, as the worker last measured", "max"
)
