"""What a load run does, as data shared by the harness and its generator processes.

The open-loop schedule is global: batch ``j`` is due when the cumulative offered
events reach ``j * batch``, and process ``k`` of ``n`` sends the batches with
``j % n == k``. Every process therefore keeps its exact share of the rate and the
processes' sends interleave evenly, with no coordination during the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import msgspec

from evd.bench.traffic import TrafficConfig


class Spike(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A period during which the offered rate is multiplied (the album-drop herd)."""

    at_s: float
    duration_s: float
    factor: float
    hot_share: float = 0.3
    """Share of plays that go to the new album's tracks during the spike."""

    @property
    def end_s(self) -> float:
        """Offset (s) at which the spike stops."""
        return self.at_s + self.duration_s


class RunPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a generator process needs to run its share of the load."""

    target: str
    api_key: str
    duration_s: float
    rate: float | None
    """Offered events/s (open loop); ``None`` means closed loop at max."""
    batch: int
    procs: int
    connections: int
    """Connections per process (bounds its requests in flight)."""
    gzip: bool
    timeout_s: float
    interval_s: float
    traffic: TrafficConfig
    spike: Spike | None = None
    replay: str | None = None
    rebase: bool = False
    pregenerate: bool = False
    max_backlog: int = 20_000
    """Scheduled-but-unsent batches a process keeps before the scheduler waits."""
    events_path: str = "/v1/events"

    @property
    def mode(self) -> str:
        """``open`` (fixed schedule) or ``closed`` (max rate)."""
        return "closed" if self.rate is None else "open"

    def rate_at(self, t: float) -> float:
        """Offered events/s at offset ``t`` (open loop)."""
        assert self.rate is not None
        if self.spike is not None and self.spike.at_s <= t < self.spike.end_s:
            return self.rate * self.spike.factor
        return self.rate

    def events_until(self, t: float) -> float:
        """Events offered from the start up to offset ``t`` (open loop)."""
        assert self.rate is not None
        base = self.rate * t
        s = self.spike
        if s is None:
            return base
        inside = max(0.0, min(t, s.end_s) - s.at_s)
        return base + inside * self.rate * (s.factor - 1.0)

    def time_of_events(self, events: float) -> float:
        """Inverse of ``events_until``: the offset at which ``events`` have been offered."""
        assert self.rate is not None
        s = self.spike
        if s is None:
            return events / self.rate
        before = self.rate * s.at_s
        if events <= before:
            return events / self.rate
        during = self.rate * s.factor * s.duration_s
        if events <= before + during:
            return s.at_s + (events - before) / (self.rate * s.factor)
        return s.end_s + (events - before - during) / self.rate

    def total_batches(self) -> int:
        """Batches the open-loop schedule offers within the duration."""
        return math.ceil(self.events_until(self.duration_s) / self.batch)

    def phase_of(self, t: float) -> str:
        """Name of the phase at offset ``t``: steady, or before/spike/after."""
        s = self.spike
        if s is None:
            return "steady"
        if t < s.at_s:
            return "before"
        if t < s.end_s:
            return "spike"
        return "after"


def my_batches(plan: RunPlan, proc: int) -> Iterator[tuple[int, float]]:
    """Yield ``(j, offset_s)`` for the open-loop batches process ``proc`` sends."""
    total = plan.total_batches()
    for j in range(proc, total, plan.procs):
        yield j, plan.time_of_events(j * plan.batch)
