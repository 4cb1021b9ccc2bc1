"""Prometheus metrics of one server, whichever of its workers answers the scrape.

Every number a worker counts lives in a fixed slot of one array of 8-byte
values (``HOT.counts``, with ``HOT.floats`` the same bytes read as doubles for
the sums). Under a supervisor that array is the file
``<run_dir>/metrics/w<k>.bin``, mapped shared into worker ``k``, its only
writer; a scrape on any worker reads every worker's file and sums them, so
``/metrics`` reports the whole server, exact and current, including what a
worker counted before it died (its replacement maps the same file and goes on
counting). Without a run dir (a ``Server`` built in-process) the array is a
private bytearray and a scrape reads it alone.

Why not prometheus-client's objects: ``Counter.inc`` and ``Histogram.observe``
take a lock and cost about 15% of the CPU of a single-event POST, and its
multiprocess mode does more per update and leaves a file per pid behind. Here
an update is one aligned 8-byte store into the mapping, which readers on other
cores see at once; aligned 8-byte loads and stores do not tear, so nobody
locks. Every update runs on the worker's event loop thread (one writer per
slot), so the read-modify-write of ``+=`` needs no lock either.

Label sets are bounded, so every series has its slot: the five path labels,
the HTTP statuses, the rejection reasons below. Gauges that only mean something
while their worker runs (connections, pending bytes, readiness) count for live
workers only, as ``HostState`` tells them.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from evd.core.host import HostState

__all__ = [
    "ACCEPTED",
    "CONNECTIONS",
    "DUPLICATES",
    "HOT",
    "LATENCY_BUCKETS",
    "LOG_BYTES_WRITTEN",
    "LOG_FLUSH_BYTES",
    "LOG_FLUSH_SECONDS",
    "LOG_FSYNC_SECONDS",
    "PATHS",
    "READY",
    "RECEIVED",
    "REJECT_REASONS",
    "STATUSES",
    "SinkMetrics",
    "Slots",
    "render",
    "set_sinks",
    "start_worker",
    "stop_worker",
    "worker_file",
]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)
FLUSH_BYTES_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
#: ``evd_events_rejected_total{reason}``: every reason ingest counts.
REJECT_REASONS = ("invalid", "too_many_events", "rate_limited", "overloaded", "log_unavailable")
#: ``evd_http_requests_total{path}``: the server's path labels (server._PATH_LABELS) and "other".
PATHS = ("/v1/events", "/healthz", "/readyz", "/metrics", "/v1/charts/top-tracks", "other")
#: ``evd_http_requests_total{status}``: every status the edge can render (http.render).
STATUSES = tuple(sorted(s.value for s in HTTPStatus))
#: How often a worker publishes the gauges others read (pending bytes, readiness).
PUBLISH_INTERVAL_S = 0.25
METRICS_DIR = "metrics"


class _Layout:
    """Hands out slot numbers; slot 0 holds the file's magic."""

    def __init__(self) -> None:
        self.size = 1
        self.floats: list[int] = []

    def take(self, n: int = 1) -> int:
        first = self.size
        self.size += n
        return first

    def take_float(self) -> int:
        slot = self.take()
        self.floats.append(slot)
        return slot


_LAYOUT = _Layout()
RECEIVED = _LAYOUT.take()
ACCEPTED = _LAYOUT.take()
DUPLICATES = _LAYOUT.take()
_REJECTED = _LAYOUT.take(len(REJECT_REASONS))
_REJECT_SLOT = {reason: _REJECTED + i for i, reason in enumerate(REJECT_REASONS)}
_REQUESTS = _LAYOUT.take(len(PATHS) * len(STATUSES))
#: Where a status outside STATUSES would be counted (http.render cannot send
#: one); never reported.
_UNLABELLED = _LAYOUT.take()
#: path label -> status -> slot (a list indexed by the status: no tuple per request).
_REQUEST_SLOT = {path: [_UNLABELLED] * 600 for path in PATHS}
for _p, _path in enumerate(PATHS):
    for _s, _status in enumerate(STATUSES):
        _REQUEST_SLOT[_path][_status] = _REQUESTS + _p * len(STATUSES) + _s
_LATENCY = _LAYOUT.take(len(LATENCY_BUCKETS) + 1)
_LATENCY_SUM = _LAYOUT.take_float()
_CONNECTIONS = _LAYOUT.take()
#: What /readyz or /metrics last saw here (READY): the server's readiness for a
#: process that publishes no SERVING flag (a Server built in-process).
_READY = _LAYOUT.take()
#: 1 while the worker itself would serve (not draining, its log writable), as
#: it publishes it; whether every worker is up is read at scrape time instead.
_SERVING = _LAYOUT.take()
_PENDING = _LAYOUT.take()
#: Slots that describe a running worker, zeroed when a worker (re)starts.
_GAUGES = [_CONNECTIONS, _READY, _SERVING, _PENDING]


class Slots:
    """One worker's counts: ``counts`` (int64) and ``floats`` (double) over one buffer.

    The hot path writes them directly (``HOT.counts[RECEIVED] += n``) or through
    the methods below; both are single stores into the buffer.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: mmap.mmap | bytearray = bytearray(size * 8)
        self.counts = memoryview(self.buffer).cast("q")
        self.floats = memoryview(self.buffer).cast("d")

    def use(self, buffer: mmap.mmap | bytearray) -> mmap.mmap | bytearray:
        """Count into ``buffer`` from now on; returns the buffer used so far."""
        old = self.buffer
        self.counts.release()
        self.floats.release()
        self.buffer = buffer
        self.counts = memoryview(buffer).cast("q")
        self.floats = memoryview(buffer).cast("d")
        return old

    def reject(self, reason: str, events: int) -> None:
        self.counts[_REJECT_SLOT[reason]] += events

    def request(self, path: str, status: int) -> None:
        """One answered request; ``path`` is one of PATHS."""
        self.counts[_REQUEST_SLOT[path][status]] += 1

    def observe_request(self, seconds: float) -> None:
        self.counts[_LATENCY + bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.floats[_LATENCY_SUM] += seconds


class Counter:
    """A counter in the worker's slots (one writer thread); reported summed over workers."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.slot = _LAYOUT.take()
        _COUNTERS.append(self)

    def inc(self, amount: int = 1) -> None:
        HOT.counts[self.slot] += amount


_COUNTERS: list[Counter] = []


class WorkerGauge:
    """A gauge each live worker sets for itself; reported per worker (label
    ``worker``) and, with ``total``, summed or maxed over live workers too."""

    def __init__(self, name: str, documentation: str, total: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.total = total  # "sum", "max" or None
        self.slot = _LAYOUT.take()
        _WORKER_GAUGES.append(self)

    def set(self, value: float) -> None:
        HOT.counts[self.slot] = int(value)


_WORKER_GAUGES: list[WorkerGauge] = []


class Gauge:
    """A gauge of the worker's (the server's value sums live workers)."""

    def __init__(self, slot: int) -> None:
        self.slot = slot

    def inc(self) -> None:
        HOT.counts[self.slot] += 1

    def dec(self) -> None:
        HOT.counts[self.slot] -= 1

    def set(self, value: int) -> None:
        HOT.counts[self.slot] = int(value)


class Histogram:
    """A histogram in the worker's slots: a count per bucket, +Inf, then the sum."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.buckets = tuple(buckets)
        self.base = _LAYOUT.take(len(self.buckets) + 1)
        self.sum_slot = _LAYOUT.take_float()

    def observe(self, value: float) -> None:
        HOT.counts[self.base + bisect_left(self.buckets, value)] += 1
        HOT.floats[self.sum_slot] += value

    def family(self, counts: Sequence[int], floats: Sequence[float]) -> HistogramMetricFamily:
        return _histogram(
            self.name, self.documentation, self.buckets,
            counts[self.base: self.base + len(self.buckets) + 1], floats[self.sum_slot],
        )


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
PROCESSED = Counter("evd_processor_events", "Raw events the processors took in (duplicates too)")
PROCESSOR_DUPLICATES = Counter(
    "evd_processor_duplicates", "Events dropped by the processors' dedup window"
)
PROCESSOR_LATE = Counter("evd_processor_late", "Events older than the watermark (late stream)")
PROCESSOR_FORCED = Counter(
    "evd_processor_forced",
    "Events released before the watermark passed them (ordering buffer full)",
)
SESSIONS_CLOSED = Counter("evd_sessions_closed", "Sessions closed and emitted")
CHART_ROWS = Counter("evd_chart_rows", "Chart rows emitted for closed windows")
SNAPSHOTS = Counter("evd_snapshots", "Processor snapshots written")
PROCESSOR_LAG_BYTES = WorkerGauge(
    "evd_processor_lag_bytes", "Raw log bytes the worker's processors have not read", "sum"
)
PROCESSOR_LAG_SECONDS = WorkerGauge(
    "evd_processor_lag_seconds",
    "Age of the oldest raw record the worker's processors have not read", "max",
)
OPEN_SESSIONS = WorkerGauge("evd_open_sessions", "Sessions open in the processors", "sum")
BUFFERED_EVENTS = WorkerGauge(
    "evd_processor_buffered_events", "Events waiting for the watermark", "sum"
)
CONNECTIONS = Gauge(_CONNECTIONS)
READY = Gauge(_READY)
LAKE_LATE_ROWS = Counter(
    "evd_lake_late_rows",
    "Rows the files sinks wrote to the late layout (their hour already had _SUCCESS)",
)
AUDIT_ROWS = Counter("evd_audit_events", "Raw events the audit counted as accepted")

#: Stages with sink metrics: the config's sinks (at most config.MAX_SINKS) and
#: the audit stage; each has its slots whatever the config (a fixed layout).
MAX_SINKS = 16
#: Batch write time and end-to-end delay (received_at -> delivered), seconds.
DELIVERY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
)
_NB = len(DELIVERY_BUCKETS) + 1
_SINK_DELIVERED = _LAYOUT.take(MAX_SINKS)
_SINK_FAILED = _LAYOUT.take(MAX_SINKS)
_SINK_RETRIES = _LAYOUT.take(MAX_SINKS)
_SINK_DEAD = _LAYOUT.take(MAX_SINKS)
_SINK_BATCHES = _LAYOUT.take(MAX_SINKS)
_SINK_LAG_BYTES = _LAYOUT.take(MAX_SINKS)
_SINK_LAG_SECONDS = _LAYOUT.take(MAX_SINKS)
_SINK_WRITE = _LAYOUT.take(MAX_SINKS * _NB)
_SINK_WRITE_SUM = [_LAYOUT.take_float() for _ in range(MAX_SINKS)]
_SINK_DELAY = _LAYOUT.take(MAX_SINKS * _NB)
_SINK_DELAY_SUM = [_LAYOUT.take_float() for _ in range(MAX_SINKS)]
_GAUGES += [_SINK_LAG_BYTES + i for i in range(MAX_SINKS)]
_GAUGES += [_SINK_LAG_SECONDS + i for i in range(MAX_SINKS)]
#: The configured sinks' names, by index (label ``sink``); set by set_sinks().
_SINK_NAMES: list[str] = []


def set_sinks(names: Sequence[str]) -> None:
    """Name the sinks (the config's order); every worker has the same config."""
    if len(names) > MAX_SINKS:
        raise ValueError(f"at most {MAX_SINKS} sinks")
    _SINK_NAMES[:] = names


class SinkMetrics:
    """The counts of sink number ``index`` (its place in the config's list)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        if not 0 <= index < MAX_SINKS:
            raise ValueError(f"sink index {index}: at most {MAX_SINKS} sinks")
        self.index = index

    def delivered(self, items: int) -> None:
        HOT.counts[_SINK_DELIVERED + self.index] += items
        HOT.counts[_SINK_BATCHES + self.index] += 1

    def failed(self, items: int) -> None:
        HOT.counts[_SINK_FAILED + self.index] += items

    def retry(self) -> None:
        HOT.counts[_SINK_RETRIES + self.index] += 1

    def dead_lettered(self, items: int) -> None:
        HOT.counts[_SINK_DEAD + self.index] += items

    def write_time(self, seconds: float) -> None:
        i = self.index
        HOT.counts[_SINK_WRITE + i * _NB + bisect_left(DELIVERY_BUCKETS, seconds)] += 1
        HOT.floats[_SINK_WRITE_SUM[i]] += seconds

    def delay(self, seconds: float, items: int) -> None:
        """``items`` delivered ``seconds`` after they were received (one observation each)."""
        i = self.index
        HOT.counts[_SINK_DELAY + i * _NB + bisect_left(DELIVERY_BUCKETS, seconds)] += items
        HOT.floats[_SINK_DELAY_SUM[i]] += seconds * items

    def lag(self, nbytes: int, seconds: float) -> None:
        HOT.counts[_SINK_LAG_BYTES + self.index] = nbytes
        HOT.counts[_SINK_LAG_SECONDS + self.index] = int(seconds * 1000)

_GAUGES += [gauge.slot for gauge in _WORKER_GAUGES]
SLOTS = _LAYOUT.size
FLOAT_SLOTS = tuple(_LAYOUT.floats)
#: Slot 0 of every file: "evdm", then the layout's size (a file of another
#: layout is not read as this one).
MAGIC = (0x6576646D << 32) | SLOTS
FILE_SIZE = -(-SLOTS * 8 // mmap.PAGESIZE) * mmap.PAGESIZE

HOT = Slots(SLOTS)
HOT.counts[0] = MAGIC


def worker_file(run_dir: Path, index: int) -> Path:
    """Where worker ``index`` keeps its counts."""
    return run_dir / METRICS_DIR / f"w{index}.bin"


def _open_own(path: Path) -> mmap.mmap:
    """Map ``path`` read-write, keeping its counts if it holds this layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                if os.fstat(fd).st_size == FILE_SIZE:
                    mm = mmap.mmap(fd, FILE_SIZE)
                    if memoryview(mm)[:8].cast("q")[0] == MAGIC:
                        return mm
                    mm.close()
            finally:
                os.close(fd)
        # Missing or of another layout: a fresh file, complete before its name appears.
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC.to_bytes(8, "little", signed=True) + bytes(FILE_SIZE - 8))
        os.replace(tmp, path)
    raise OSError(f"{path}: cannot map the metrics file")


def _read(path: Path) -> tuple[list[int], list[float]] | None:
    """Another worker's counts (None while it has no file of this layout)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != FILE_SIZE:
                return None
            mm = mmap.mmap(f.fileno(), FILE_SIZE, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None
    try:
        # Item by item through the memoryview: each value is one aligned 8-byte load.
        with memoryview(mm) as view, view.cast("q") as q, view.cast("d") as d:
            counts = q[:SLOTS].tolist()
            floats = cast(list[float], d[:SLOTS].tolist())
        return (counts, floats) if counts[0] == MAGIC else None
    finally:
        mm.close()


@dataclass
class _Worker:
    """This process's place in the server, as ``start_worker`` set it."""

    run_dir: Path | None = None
    index: int = 0
    workers: int = 1
    pending_bytes: Callable[[], int] | None = None
    serving: Callable[[], bool] | None = None
    timer: asyncio.TimerHandle | None = None
    #: Which workers are up and how often each restarted (the supervisor's, or
    #: this process alone).
    host: HostState = field(default_factory=HostState.alone)

    def publish(self) -> None:
        """Write the gauges that other workers read but only this one knows."""
        if self.pending_bytes is not None:
            HOT.counts[_PENDING] = self.pending_bytes()
        if self.serving is not None:
            HOT.counts[_SERVING] = int(self.serving())

    def tick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no event loop (a tool, a test): published at scrape time only
        if loop is not None:
            self.timer = loop.call_later(PUBLISH_INTERVAL_S, self.tick)
        self.publish()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.host.close()
        self.run_dir, self.index, self.workers = None, 0, 1
        self.pending_bytes = self.serving = self.timer = None
        self.host = HostState.alone()


_WORKER = _Worker()


def start_worker(
    run_dir: Path | None,
    index: int,
    workers: int,
    pending_bytes: Callable[[], int],
    serving: Callable[[], bool] | None = None,
) -> None:
    """Make this process worker ``index`` of ``workers`` for the metrics.

    With a ``run_dir``, count into ``<run_dir>/metrics/w<index>.bin`` (going on
    from its counts when worker ``index`` ran before) and read the other
    workers' files, and the supervisor's HostState, at scrape time.
    ``pending_bytes`` (the log's bytes waiting for a flush) and ``serving``
    (whether this worker would serve: not draining, its log writable) are
    published now and every PUBLISH_INTERVAL_S for the other workers' scrapes,
    when called from the worker's event loop (as it should be, before it
    listens). ``stop_worker`` undoes it.
    """
    stop_worker()
    if run_dir is not None:
        HOT.use(_open_own(worker_file(run_dir, index)))
        _WORKER.host = HostState.attach(run_dir)
    for slot in _GAUGES:
        HOT.counts[slot] = 0
    _WORKER.run_dir = run_dir
    _WORKER.index = index
    _WORKER.workers = workers
    _WORKER.pending_bytes = pending_bytes
    _WORKER.serving = serving
    _WORKER.tick()


def stop_worker() -> None:
    """Stop publishing; count into a private buffer again (starting from the current counts)."""
    _WORKER.stop()
    HOT.counts[_READY] = HOT.counts[_SERVING] = HOT.counts[_PENDING] = 0
    if isinstance(HOT.buffer, mmap.mmap):
        old = HOT.use(bytearray(HOT.buffer[: SLOTS * 8]))
        assert isinstance(old, mmap.mmap)
        old.close()


def render() -> bytes:
    """The Prometheus text of the whole server: every worker's counts, merged."""
    _WORKER.publish()
    return generate_latest(_registry(_Scrape(_WORKER)))


def _registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets (upper bound, cumulative count) of per-bucket ``counts``
    (one per bound, then +Inf)."""
    cumulative, buckets = 0, []
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += n
        buckets.append((bound, float(cumulative)))
    return buckets


def _histogram(
    name: str, documentation: str, bounds: Sequence[float], counts: Sequence[int], total: float
) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=_cumulative(bounds, counts), sum_value=total
    )


class _Scrape(Collector):
    """The families of one scrape, from every worker's slots."""

    def __init__(self, worker: _Worker) -> None:
        self.host = worker.host
        self.worker = worker

    def _per_worker(self) -> list[tuple[list[int], list[float]] | None]:
        """Each worker's (counts, floats), None for one that never ran."""
        own = self.worker
        views: list[tuple[list[int], list[float]] | None] = []
        for k in range(max(own.workers, own.index + 1)):
            if k == own.index:
                floats = cast(list[float], HOT.floats[:SLOTS].tolist())
                views.append((HOT.counts[:SLOTS].tolist(), floats))
            elif own.run_dir is not None:
                views.append(_read(worker_file(own.run_dir, k)))
            else:
                views.append(None)
        return views

    @staticmethod
    def _sinks(
        counts: list[int], floats: list[float], live: list[tuple[list[int], list[float]]]
    ) -> Iterator[Metric]:
        """The sink families, labelled by sink name."""
        names = list(enumerate(_SINK_NAMES))
        for slot, name, doc in (
            (_SINK_DELIVERED, "evd_sink_delivered", "Items the sink wrote (confirmed, committed)"),
            (_SINK_FAILED, "evd_sink_failed", "Items of writes that failed (each try)"),
            (_SINK_RETRIES, "evd_sink_retries", "Writes tried again after a failure"),
            (_SINK_DEAD, "evd_sink_dead_lettered", "Items the sink gave up on (to dead_letter)"),
            (_SINK_BATCHES, "evd_sink_batches", "Batches the sink wrote"),
        ):
            family = CounterMetricFamily(name, doc, labels=["sink"])
            for i, sink in names:
                family.add_metric([sink], counts[slot + i])
            yield family
        lag_bytes = GaugeMetricFamily(
            "evd_sink_lag_bytes", "Log bytes the sink has not delivered (sum over workers)",
            labels=["sink"],
        )
        lag_seconds = GaugeMetricFamily(
            "evd_sink_lag_seconds",
            "Age of the oldest record the sink has not delivered (max over workers)",
            labels=["sink"],
        )
        for i, sink in names:
            lag_bytes.add_metric([sink], sum(c[_SINK_LAG_BYTES + i] for c, _ in live))
            seconds = max((c[_SINK_LAG_SECONDS + i] for c, _ in live), default=0) / 1000
            lag_seconds.add_metric([sink], seconds)
        yield lag_bytes
        yield lag_seconds
        for base, sums, name, doc in (
            (_SINK_WRITE, _SINK_WRITE_SUM, "evd_sink_write_seconds", "Time of one batch write"),
            (
                _SINK_DELAY, _SINK_DELAY_SUM, "evd_sink_delivery_delay_seconds",
                "From received_at (or the record's append) to delivered, per item",
            ),
        ):
            histogram = HistogramMetricFamily(name, doc, labels=["sink"])
            for i, sink in names:
                start = base + i * _NB
                buckets = _cumulative(DELIVERY_BUCKETS, counts[start: start + _NB])
                histogram.add_metric([sink], buckets, floats[sums[i]])
            yield histogram

    def collect(self) -> Iterator[Metric]:
        host = self.host
        views = self._per_worker()
        present = [v for v in views if v is not None]
        counts = [sum(col) for col in zip(*(c for c, _ in present), strict=True)]
        floats = [0.0] * SLOTS
        for slot in FLOAT_SLOTS:
            floats[slot] = sum(f[slot] for _, f in present)
        up = [k < host.workers and host.up(k) for k in range(len(views))]
        live = [v for v, alive in zip(views, up, strict=True) if alive and v is not None]

        yield CounterMetricFamily(
            "evd_events_received", "Events received in POST /v1/events bodies", counts[RECEIVED]
        )
        yield CounterMetricFamily(
            "evd_events_accepted", "Events durably appended to the raw log", counts[ACCEPTED]
        )
        yield CounterMetricFamily(
            "evd_events_duplicates",
            "Events dropped at the edge because their event_id was just seen",
            counts[DUPLICATES],
        )
        rejected = CounterMetricFamily(
            "evd_events_rejected",
            "Events rejected (per-event validation or whole request)",
            labels=["reason"],
        )
        for reason in REJECT_REASONS:
            rejected.add_metric([reason], counts[_REJECT_SLOT[reason]])
        yield rejected
        requests = CounterMetricFamily(
            "evd_http_requests", "HTTP requests answered", labels=["path", "status"]
        )
        for p, path in enumerate(PATHS):
            for s, status in enumerate(STATUSES):
                n = counts[_REQUESTS + p * len(STATUSES) + s]
                if n:
                    requests.add_metric([path, str(status)], n)
        yield requests
        yield _histogram(
            "evd_request_duration_seconds",
            "POST /v1/events time from the end of the body to the response (includes the fsync)",
            LATENCY_BUCKETS, counts[_LATENCY: _LATENCY + len(LATENCY_BUCKETS) + 1],
            floats[_LATENCY_SUM],
        )
        for histogram in (LOG_FLUSH_SECONDS, LOG_FSYNC_SECONDS, LOG_FLUSH_BYTES):
            yield histogram.family(counts, floats)
        for counter in _COUNTERS:
            yield CounterMetricFamily(counter.name, counter.documentation, counts[counter.slot])
        live_index = [k for k, alive in enumerate(up) if alive and views[k] is not None]
        for gauge in _WORKER_GAUGES:
            family = GaugeMetricFamily(gauge.name, gauge.documentation, labels=["worker"])
            values = []
            for k in live_index:
                view = views[k]
                assert view is not None
                values.append(view[0][gauge.slot])
                family.add_metric([str(k)], view[0][gauge.slot])
            yield family
            if gauge.total is not None:
                total = sum(values) if gauge.total == "sum" else max(values, default=0)
                yield GaugeMetricFamily(
                    f"{gauge.name}_{gauge.total}", f"{gauge.documentation} ({gauge.total} over workers)",
                    total,
                )
        yield from self._sinks(counts, floats, live)
        yield GaugeMetricFamily(
            "evd_http_connections", "Open HTTP connections",
            sum(c[_CONNECTIONS] for c, _ in live),
        )
        if self.worker.serving is not None:
            ready = all(up) and all(c[_SERVING] for c, _ in live)
        else:
            ready = bool(HOT.counts[_READY])
        yield GaugeMetricFamily(
            "evd_ready", "1 when /readyz answers 200 (every worker up and serving)", ready
        )

        worker_up = GaugeMetricFamily(
            "evd_worker_up", "1 while the worker serves", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "evd_worker_restarts", "Times the supervisor restarted the worker", labels=["worker"]
        )
        pending = GaugeMetricFamily(
            "evd_log_pending_bytes", "Bytes the worker's log holds for its next flush",
            labels=["worker"],
        )
        worker_requests = CounterMetricFamily(
            "evd_worker_requests", "HTTP requests the worker answered", labels=["worker"]
        )
        worker_received = CounterMetricFamily(
            "evd_worker_events_received", "Events the worker received", labels=["worker"]
        )
        end = _REQUESTS + len(PATHS) * len(STATUSES)
        for k, view in enumerate(views):
            label = [str(k)]
            worker_up.add_metric(label, up[k])
            restarts.add_metric(label, host.restarts(k) if k < host.workers else 0)
            c = view[0] if view is not None else None
            pending.add_metric(label, c[_PENDING] if c is not None and up[k] else 0)
            worker_requests.add_metric(label, sum(c[_REQUESTS:end]) if c is not None else 0)
            worker_received.add_metric(label, c[RECEIVED] if c is not None else 0)
        yield worker_up
        yield restarts
        yield pending
        yield worker_requests
        yield worker_received
