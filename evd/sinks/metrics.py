"""Delivery's metrics: per sink (label ``sink``) items delivered, failed, retried,
dead-lettered, batches, lag, write time and delivery delay; the lake's late rows
and the audit's accepted events."""

from __future__ import annotations

from collections.abc import Sequence

from evd.core import config
from evd.core.metrics.kinds import Counter, CounterVec, GaugeVec, HistogramVec, Labels

__all__ = [
    "AUDIT_ROWS",
    "DELIVERY_BUCKETS",
    "LAKE_LATE_ROWS",
    "MAX_SINKS",
    "SinkMetrics",
    "set_sinks",
]

#: Stages with sink metrics: the config's sinks (at most config.MAX_SINKS) and
#: the audit stage; each has its slots whatever the config (a fixed layout).
MAX_SINKS = config.MAX_SINKS + 1
#: Batch write time and end-to-end delay (received_at -> delivered), seconds.
DELIVERY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
)
#: The configured sinks' names, by index; set by set_sinks().
_SINK = Labels("sink", MAX_SINKS)

_DELIVERED = CounterVec("evd_sink_delivered", "Items the sink wrote (confirmed, committed)", _SINK)
_FAILED = CounterVec("evd_sink_failed", "Items of writes that failed (each try)", _SINK)
_RETRIES = CounterVec("evd_sink_retries", "Writes tried again after a failure", _SINK)
_DEAD = CounterVec("evd_sink_dead_lettered", "Items the sink gave up on (to dead_letter)", _SINK)
_BATCHES = CounterVec("evd_sink_batches", "Batches the sink wrote", _SINK)
_LAG_BYTES = GaugeVec(
    "evd_sink_lag_bytes", "Log bytes the sink has not delivered (sum over workers)", _SINK, "sum"
)
#: Kept in milliseconds.
_LAG_SECONDS = GaugeVec(
    "evd_sink_lag_seconds",
    "Age of the oldest record the sink has not delivered (max over workers)", _SINK, "max",
    scale=1000,
)
_WRITE = HistogramVec(
    "evd_sink_write_seconds", "Time of one batch write", _SINK, DELIVERY_BUCKETS
)
_DELAY = HistogramVec(
    "evd_sink_delivery_delay_seconds",
    "From received_at (or the record's append) to delivered, per item", _SINK, DELIVERY_BUCKETS,
)
LAKE_LATE_ROWS = Counter(
    "evd_lake_late_rows",
    "Rows the files sinks wrote to the late layout (their hour already had _SUCCESS)",
)
AUDIT_ROWS = Counter("evd_audit_events", "Raw events the audit counted as accepted")


def set_sinks(names: Sequence[str]) -> None:
    """Name the sinks (the config's order); every worker has the same config."""
    _SINK.set(names)


class SinkMetrics:
    """The counts of sink number ``index`` (its place in the config's list)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        _SINK.check(index)
        self.index = index

    def delivered(self, items: int) -> None:
        _DELIVERED.inc(self.index, items)
        _BATCHES.inc(self.index)

    def failed(self, items: int) -> None:
        _FAILED.inc(self.index, items)

    def retry(self) -> None:
        _RETRIES.inc(self.index)

    def dead_lettered(self, items: int) -> None:
        _DEAD.inc(self.index, items)

    def write_time(self, seconds: float) -> None:
        _WRITE.observe(self.index, seconds)

    def delay(self, seconds: float, items: int) -> None:
        """``items`` delivered ``seconds`` after they were received (one observation each)."""
        _DELAY.observe(self.index, seconds, items)

    def lag(self, nbytes: int, seconds: float) -> None:
        _LAG_BYTES.set(self.index, nbytes)
        _LAG_SECONDS.set(self.index, seconds)
