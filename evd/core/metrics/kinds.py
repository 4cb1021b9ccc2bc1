"""The kinds of metric a stage declares, and the families each reports.

A metric takes its slots from the layout when it is constructed (at the import
of the module that declares it: see evd.core.metrics.slots) and joins the
catalogue that every scrape reports. An update is a store into ``HOT`` at the
metric's slot, which sealing may move once, before the first scrape; nothing
caches a slot number outside its metric.

Counters sum over every worker that ever ran (a dead worker's counts stay);
gauges that only mean something while their worker runs (``resets``) count for
live workers only. Label sets are bounded, so every series has its slot.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import Metric as Family

from evd.core.metrics.slots import HOT, LAYOUT, View

__all__ = [
    "LATENCY_BUCKETS",
    "Counter",
    "CounterVec",
    "Family",
    "Gauge",
    "GaugeVec",
    "Histogram",
    "HistogramVec",
    "LabelledCounter",
    "Labels",
    "Metric",
    "Reading",
    "RequestCounter",
    "WorkerGauge",
    "catalogue",
]

#: Seconds: request and flush times.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)


@dataclass(frozen=True)
class Reading:
    """One scrape: each worker's slots and whether it is live, and the sums."""

    #: Worker k's slots; None for one that never ran (no file of this layout).
    views: Sequence[View | None]
    #: Worker k counts as live (up, as the supervisor's HostState says).
    up: Sequence[bool]
    #: Every slot summed over the workers with a file.
    counts: Sequence[int]
    #: The float slots summed as doubles (the others 0.0).
    floats: Sequence[float]

    @property
    def live(self) -> list[View]:
        """The slots of the live workers."""
        return [v for v, alive in zip(self.views, self.up, strict=True) if alive and v is not None]

    @property
    def live_index(self) -> list[int]:
        """The indexes of the live workers."""
        return [k for k, alive in enumerate(self.up) if alive and self.views[k] is not None]


class Metric:
    """A declared metric: ``size`` slots in the layout, reported by ``families``."""

    #: Offsets among its slots that hold doubles.
    float_slots: Sequence[int] = ()
    #: Its slots are zeroed when a worker (re)starts and count for live workers only.
    resets = False

    def __init__(self, name: str, documentation: str, size: int) -> None:
        """Declare it; a subclass sets what ``place`` needs before calling this."""
        self.name = name
        self.documentation = documentation
        self.size = size
        LAYOUT.declare(self)
        _CATALOGUE.append(self)

    def place(self, first: int) -> None:
        """Count from slot ``first`` on."""
        raise NotImplementedError

    def families(self, reading: Reading) -> Iterator[Family]:
        """What a scrape reports of it."""
        raise NotImplementedError


_CATALOGUE: list[Metric] = []


def catalogue() -> list[Metric]:
    """Every metric declared in this process, in the order of their names."""
    return sorted(_CATALOGUE, key=lambda m: m.name)


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets (upper bound, cumulative count) of per-bucket ``counts``
    (one per bound, then +Inf)."""
    cumulative, buckets = 0, []
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += n
        buckets.append((bound, float(cumulative)))
    return buckets


def _per_worker(name: str, documentation: str, reading: Reading, slots: range) -> Family:
    """Counter ``name`` per worker (label ``worker``): its ``slots`` summed, 0 for one
    that never ran."""
    family = CounterMetricFamily(name, documentation, labels=["worker"])
    for k, view in enumerate(reading.views):
        family.add_metric([str(k)], sum(view[0][slots.start: slots.stop]) if view is not None else 0)
    return family


class Counter(Metric):
    """A counter summed over workers; with ``per_worker`` (name, documentation)
    also reported per worker."""

    def __init__(
        self, name: str, documentation: str, per_worker: tuple[str, str] | None = None
    ) -> None:
        self.slot = 0
        self.per_worker = per_worker
        super().__init__(name, documentation, 1)

    def place(self, first: int) -> None:
        self.slot = first

    def inc(self, amount: int = 1) -> None:
        HOT.counts[self.slot] += amount

    def families(self, reading: Reading) -> Iterator[Family]:
        yield CounterMetricFamily(self.name, self.documentation, reading.counts[self.slot])
        if self.per_worker is not None:
            yield _per_worker(*self.per_worker, reading, range(self.slot, self.slot + 1))


class LabelledCounter(Metric):
    """A counter with one label of fixed ``values``, summed over workers."""

    def __init__(self, name: str, documentation: str, label: str, values: Sequence[str]) -> None:
        self.label = label
        self.values = tuple(values)
        self.slot_of: dict[str, int] = {}
        super().__init__(name, documentation, len(self.values))

    def place(self, first: int) -> None:
        self.slot_of = {value: first + i for i, value in enumerate(self.values)}

    def inc(self, value: str, amount: int = 1) -> None:
        """``value`` is one of the label's values."""
        HOT.counts[self.slot_of[value]] += amount

    def families(self, reading: Reading) -> Iterator[Family]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value in self.values:
            family.add_metric([value], reading.counts[self.slot_of[value]])
        yield family


#: RequestCounter: statuses below this have a slot of their own or the unlabelled one.
_STATUS_LIMIT = 600


class RequestCounter(Metric):
    """HTTP requests by path label and status, summed over workers; a series only
    once it counted. A status outside ``statuses`` is counted where it is never
    reported. With ``per_worker`` (name, documentation) also reported per worker."""

    def __init__(
        self,
        name: str,
        documentation: str,
        paths: Sequence[str],
        statuses: Sequence[int],
        per_worker: tuple[str, str] | None = None,
    ) -> None:
        self.paths = tuple(paths)
        self.statuses = tuple(statuses)
        self.per_worker = per_worker
        self.first = 0
        #: path label -> status -> slot (a list indexed by the status: no tuple per request).
        self.slot_of: dict[str, list[int]] = {}
        super().__init__(name, documentation, len(self.paths) * len(self.statuses) + 1)

    def place(self, first: int) -> None:
        self.first = first
        unlabelled = first + len(self.paths) * len(self.statuses)
        self.slot_of = {path: [unlabelled] * _STATUS_LIMIT for path in self.paths}
        for p, path in enumerate(self.paths):
            for s, status in enumerate(self.statuses):
                self.slot_of[path][status] = first + p * len(self.statuses) + s

    def count(self, path: str, status: int) -> None:
        """One answered request; ``path`` is one of the paths."""
        HOT.counts[self.slot_of[path][status]] += 1

    def families(self, reading: Reading) -> Iterator[Family]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["path", "status"])
        for p, path in enumerate(self.paths):
            for s, status in enumerate(self.statuses):
                n = reading.counts[self.first + p * len(self.statuses) + s]
                if n:
                    family.add_metric([path, str(status)], n)
        yield family
        if self.per_worker is not None:
            labelled = range(self.first, self.first + len(self.paths) * len(self.statuses))
            yield _per_worker(*self.per_worker, reading, labelled)


class Gauge(Metric):
    """A gauge of the worker's; the server's value sums the live workers'."""

    resets = True

    def __init__(self, name: str, documentation: str) -> None:
        self.slot = 0
        super().__init__(name, documentation, 1)

    def place(self, first: int) -> None:
        self.slot = first

    def inc(self) -> None:
        HOT.counts[self.slot] += 1

    def dec(self) -> None:
        HOT.counts[self.slot] -= 1

    def set(self, value: int) -> None:
        HOT.counts[self.slot] = int(value)

    def families(self, reading: Reading) -> Iterator[Family]:
        yield GaugeMetricFamily(
            self.name, self.documentation, sum(c[self.slot] for c, _ in reading.live)
        )


class WorkerGauge(Metric):
    """A gauge each live worker sets for itself; reported per worker (label
    ``worker``) and, with ``total``, summed or maxed over live workers too."""

    resets = True

    def __init__(
        self, name: str, documentation: str, total: Literal["sum", "max"] | None = None
    ) -> None:
        self.total = total
        self.slot = 0
        super().__init__(name, documentation, 1)

    def place(self, first: int) -> None:
        self.slot = first

    def set(self, value: float) -> None:
        HOT.counts[self.slot] = int(value)

    def families(self, reading: Reading) -> Iterator[Family]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["worker"])
        values = []
        for k in reading.live_index:
            view = reading.views[k]
            assert view is not None
            values.append(view[0][self.slot])
            family.add_metric([str(k)], view[0][self.slot])
        yield family
        if self.total is not None:
            total = sum(values) if self.total == "sum" else max(values, default=0)
            yield GaugeMetricFamily(
                f"{self.name}_{self.total}", f"{self.documentation} ({self.total} over workers)",
                total,
            )


class Histogram(Metric):
    """A histogram summed over workers: a count per bucket, +Inf, then the sum."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.float_slots = (len(self.buckets) + 1,)
        self.base = 0
        self.sum_slot = 0
        super().__init__(name, documentation, len(self.buckets) + 2)

    def place(self, first: int) -> None:
        self.base = first
        self.sum_slot = first + len(self.buckets) + 1

    def observe(self, value: float) -> None:
        HOT.counts[self.base + bisect_left(self.buckets, value)] += 1
        HOT.floats[self.sum_slot] += value

    def families(self, reading: Reading) -> Iterator[Family]:
        counts = reading.counts[self.base: self.base + len(self.buckets) + 1]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=_cumulative(self.buckets, counts),
            sum_value=reading.floats[self.sum_slot],
        )


class Labels:
    """A label whose values are named at run time (the config's sinks), by index,
    at most ``capacity`` of them: every index has its slots whatever the names."""

    def __init__(self, label: str, capacity: int) -> None:
        self.label = label
        self.capacity = capacity
        self.names: list[str] = []

    def set(self, names: Sequence[str]) -> None:
        """The values, by index (every worker names them alike)."""
        if len(names) > self.capacity:
            raise ValueError(f"at most {self.capacity} {self.label}s")
        self.names[:] = names

    def check(self, index: int) -> None:
        """Refuse an index without slots."""
        if not 0 <= index < self.capacity:
            raise ValueError(f"{self.label} index {index}: at most {self.capacity} {self.label}s")


class CounterVec(Metric):
    """A counter per index of ``labels``, summed over workers; the named indexes reported."""

    def __init__(self, name: str, documentation: str, labels: Labels) -> None:
        self.labels = labels
        self.first = 0
        super().__init__(name, documentation, labels.capacity)

    def place(self, first: int) -> None:
        self.first = first

    def inc(self, index: int, amount: int = 1) -> None:
        HOT.counts[self.first + index] += amount

    def families(self, reading: Reading) -> Iterator[Family]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.labels.label])
        for i, value in enumerate(self.labels.names):
            family.add_metric([value], reading.counts[self.first + i])
        yield family


class GaugeVec(Metric):
    """A gauge per index of ``labels`` each worker sets for itself; reported summed
    or maxed over live workers. Stored as ``int(value * scale)``."""

    resets = True

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Labels,
        total: Literal["sum", "max"],
        scale: int = 1,
    ) -> None:
        self.labels = labels
        self.total = total
        self.scale = scale
        self.first = 0
        super().__init__(name, documentation, labels.capacity)

    def place(self, first: int) -> None:
        self.first = first

    def set(self, index: int, value: float) -> None:
        HOT.counts[self.first + index] = int(value * self.scale)

    def families(self, reading: Reading) -> Iterator[Family]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.labels.label])
        live = reading.live
        for i, value in enumerate(self.labels.names):
            slot = self.first + i
            if self.total == "sum":
                total: float = sum(c[slot] for c, _ in live)
            else:
                total = max((c[slot] for c, _ in live), default=0)
            family.add_metric([value], total / self.scale if self.scale != 1 else total)
        yield family


class HistogramVec(Metric):
    """A histogram per index of ``labels``, summed over workers: per index a count
    per bucket and +Inf; then the sums, one per index."""

    def __init__(
        self, name: str, documentation: str, labels: Labels, buckets: Sequence[float]
    ) -> None:
        self.labels = labels
        self.buckets = tuple(buckets)
        self.per_index = len(self.buckets) + 1
        self.float_slots = tuple(range(labels.capacity * self.per_index, labels.capacity * (self.per_index + 1)))
        self.first = 0
        self.sums = 0
        super().__init__(name, documentation, labels.capacity * (self.per_index + 1))

    def place(self, first: int) -> None:
        self.first = first
        self.sums = first + self.labels.capacity * self.per_index

    def observe(self, index: int, value: float, times: int = 1) -> None:
        """``times`` observations of ``value``."""
        HOT.counts[self.first + index * self.per_index + bisect_left(self.buckets, value)] += times
        HOT.floats[self.sums + index] += value * times

    def families(self, reading: Reading) -> Iterator[Family]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.labels.label])
        for i, value in enumerate(self.labels.names):
            start = self.first + i * self.per_index
            buckets = _cumulative(self.buckets, reading.counts[start: start + self.per_index])
            family.add_metric([value], buckets, reading.floats[self.sums + i])
        yield family
