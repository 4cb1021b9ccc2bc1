"""Prometheus metrics of one worker process.

What the hot path touches per request lives in ``HOT``, plain ints and a
bucket array, read by a collector at scrape time: prometheus-client's
``Counter.inc`` and ``Histogram.observe`` take a lock and cost about 15% of the
CPU of a single-event POST. Everything else uses prometheus-client directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)


class HotStats:
    """Counters of the event loop thread (the only writer, so no lock)."""

    def __init__(self) -> None:
        self.received = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected: dict[str, int] = {}
        self.requests: dict[tuple[str, int], int] = {}
        #: Request latency: counts per bucket of LATENCY_BUCKETS, then +Inf.
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def reject(self, reason: str, events: int) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + events

    def request(self, path: str, status: int) -> None:
        key = (path, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_request(self, seconds: float) -> None:
        self.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class _HotCollector(Collector):
    def __init__(self, stats: HotStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        yield CounterMetricFamily(
            "evd_events_received", "Events received in POST /v1/events bodies", s.received
        )
        yield CounterMetricFamily(
            "evd_events_accepted", "Events durably appended to the raw log", s.accepted
        )
        yield CounterMetricFamily(
            "evd_events_duplicates",
            "Events dropped at the edge because their event_id was just seen",
            s.duplicates,
        )
        rejected = CounterMetricFamily(
            "evd_events_rejected",
            "Events rejected (per-event validation or whole request)",
            labels=["reason"],
        )
        for reason, n in sorted(s.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        requests = CounterMetricFamily(
            "evd_http_requests", "HTTP requests answered", labels=["path", "status"]
        )
        for (path, status), n in sorted(s.requests.items()):
            requests.add_metric([path, str(status)], n)
        yield requests
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), s.latency, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "evd_request_duration_seconds",
            "POST /v1/events time from the end of the body to the response (includes the fsync)",
            buckets=buckets,
            sum_value=s.latency_sum,
        )


HOT = HotStats()
REGISTRY.register(_HotCollector(HOT))

LOG_FLUSH_SECONDS = Histogram(
    "evd_log_append_seconds", "Time of one group-commit flush (write + fsync)",
    buckets=LATENCY_BUCKETS,
)
LOG_FSYNC_SECONDS = Histogram(
    "evd_log_fsync_seconds", "Time of the fsyncs of one flush or checkpoint",
    buckets=LATENCY_BUCKETS,
)
LOG_FLUSH_BYTES = Histogram(
    "evd_log_flush_bytes", "Bytes written by one group-commit flush",
    buckets=(1e3, 1e4, 1e5, 1e6, 1e7, 1e8),
)
LOG_BYTES_WRITTEN = Counter("evd_log_written_bytes", "Bytes written to log segment files")
CONNECTIONS = Gauge("evd_http_connections", "Open HTTP connections")
READY = Gauge("evd_ready", "1 when /readyz answers 200")
