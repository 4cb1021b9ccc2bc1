"""Reading the server's Prometheus ``/metrics`` before, during and after a run.

Counters are compared as deltas between two scrapes, so a server that has been
running for a while reports only what this run did. Histogram quantiles are
interpolated inside buckets the way Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from evd.core.errors import EvdError

# sample name -> list of (labels, value), every label set kept
Samples = dict[str, list[tuple[dict[str, str], float]]]

RECEIVED = "evd_events_received_total"
ACCEPTED = "evd_events_accepted_total"
REJECTED = "evd_events_rejected_total"
DUPLICATES = "evd_events_duplicates_total"
REQUEST_DURATION = "evd_request_duration_seconds"
#: Per sink (label ``sink``); the report merges every sink's deliveries.
DELIVERY_DELAY = "evd_sink_delivery_delay_seconds"
#: Age of the oldest raw record the processors have not read (max over workers).
PROCESSOR_LAG = "evd_processor_lag_seconds_max"
#: Age of the oldest record a sink has not delivered, per ``sink`` label.
SINK_LAG = "evd_sink_lag_seconds"


class MetricsError(EvdError):
    """The metrics page could not be read or parsed."""


def parse(text: str) -> Samples:
    """Parse Prometheus text exposition into samples by sample name."""
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    except ValueError as exc:
        raise MetricsError(f"metrics page is not Prometheus text: {exc}") from None
    return out


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of ``name`` over label sets matching ``labels``; None when absent."""
    rows = samples.get(name)
    if rows is None and name.endswith("_total"):
        # Older client libraries expose counters without the _total suffix.
        rows = samples.get(name[: -len("_total")])
    if rows is None:
        return None
    return sum(v for lab, v in rows if all(lab.get(k) == want for k, want in labels.items()))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Sum of ``name`` grouped by the value of ``label``."""
    out: dict[str, float] = {}
    for lab, v in samples.get(name, []):
        key = lab.get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


def label_values(samples: Samples, name: str, label: str) -> list[str]:
    """The values ``label`` takes in the samples of ``name`` (a histogram: its
    buckets), sorted."""
    rows = samples.get(name, []) or samples.get(name + "_bucket", [])
    return sorted({lab[label] for lab, _ in rows if label in lab})


def stage_lags(samples: Samples) -> dict[str, float]:
    """Lag in seconds of each stage the server reports: ``processor`` and one entry
    per sink, by its name (sink names never take ``processor``); {} when it has none."""
    out: dict[str, float] = {}
    processor = samples.get(PROCESSOR_LAG)
    if processor:
        out["processor"] = max(v for _, v in processor)
    for sink, v in by_label(samples, SINK_LAG, "sink").items():
        out[sink] = v
    return out


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """Cumulative ``(le, count)`` of histogram ``name`` over the label sets matching
    ``labels``, summed over their other labels."""
    acc: dict[float, float] = {}
    for lab, v in samples.get(name + "_bucket", []):
        le = lab.get("le")
        if le is None or any(lab.get(k) != want for k, want in labels.items()):
            continue
        bound = math.inf if le in ("+Inf", "Inf", "inf") else float(le)
        acc[bound] = acc.get(bound, 0.0) + v
    return sorted(acc.items())


def delta_buckets(after: list[tuple[float, float]],
                  before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per-bound difference of two cumulative bucket lists."""
    prior = dict(before)
    return [(le, max(0.0, count - prior.get(le, 0.0))) for le, count in after]


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile (0..1) from cumulative buckets; None when empty."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    count = cumulative[-1][1]
    rank = q * count
    prev_le, prev_count = 0.0, 0.0
    for le, c in cumulative:
        if c >= rank:
            if math.isinf(le):
                # Beyond the highest finite bucket: its bound is all we know.
                return prev_le
            if c == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (c - prev_count)
        prev_le, prev_count = le, c
    return prev_le


def counter_delta(after: Samples, before: Samples | None, name: str,
                  **labels: str) -> float | None:
    """Increase of a counter between two scrapes (None when the server lacks it)."""
    a = total(after, name, **labels)
    if a is None:
        return None
    b = total(before, name, **labels) if before is not None else None
    return a - (b or 0.0)


def label_delta(after: Samples, before: Samples | None, name: str,
                label: str) -> dict[str, float]:
    """Increase of a counter per value of ``label`` between two scrapes."""
    a = by_label(after, name, label)
    b: Mapping[str, float] = by_label(before, name, label) if before is not None else {}
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) > 0}
