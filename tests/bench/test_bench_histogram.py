"""The load harness's log-linear latency histogram."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from evd.bench.histogram import SUB_BITS, Histogram, bucket_bounds, bucket_index

# Widest bucket relative to the values it holds (see evd/bench/histogram.py).
REL_WIDTH = 1 / (1 << (SUB_BITS - 1))


@given(st.integers(min_value=0, max_value=10**12))
def test_bucket_holds_value_and_is_narrow(value: int) -> None:
    low, high = bucket_bounds(bucket_index(value))
    assert low <= value <= high
    if value >= 1 << SUB_BITS:
        assert (high - low + 1) / low <= REL_WIDTH
    else:
        assert low == high == value


def test_bucket_indexes_are_contiguous_and_monotonic() -> None:
    prev_high = -1
    for idx in range(5000):
        low, high = bucket_bounds(idx)
        assert low == prev_high + 1
        assert bucket_index(low) == idx and bucket_index(high) == idx
        prev_high = high


def _exact(values: list[int], pct: float) -> int:
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def test_percentiles_of_uniform_values() -> None:
    h = Histogram()
    for v in range(1, 100_001):
        h.record(v)
    assert h.total == 100_000
    assert h.min == 1 and h.max == 100_000
    assert abs(h.mean() - 50_000.5) < 1e-6
    for pct, want in ((50, 50_000), (90, 90_000), (99, 99_000), (99.9, 99_900)):
        got = h.percentile(pct)
        assert want <= got <= want * (1 + REL_WIDTH), (pct, got)
    assert h.percentile(100) == 100_000
    assert h.percentile(0) == 1


@given(st.lists(st.integers(min_value=0, max_value=60_000_000), min_size=1, max_size=300),
       st.sampled_from([50.0, 90.0, 99.0, 99.9]))
def test_percentile_is_never_below_exact_and_within_a_bucket(values: list[int],
                                                             pct: float) -> None:
    h = Histogram()
    for v in values:
        h.record(v)
    exact = _exact(values, pct)
    got = h.percentile(pct)
    assert exact <= got <= max(exact, math.floor(exact * (1 + REL_WIDTH)) + 1)
    assert h.percentiles([pct])["p" + f"{pct:g}"] == got


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    print("seed 7")
    parts = [Histogram() for _ in range(3)]
    whole = Histogram()
    for _ in range(5000):
        v = int(rng.lognormvariate(8, 1.5))
        rng.choice(parts).record(v)
        whole.record(v)
    merged = Histogram()
    for part in parts:
        merged.merge(part)
    assert merged.counts == whole.counts
    assert (merged.total, merged.min, merged.max, merged.sum) == (
        whole.total, whole.min, whole.max, whole.sum)
    assert merged.percentiles([50, 99, 99.9]) == whole.percentiles([50, 99, 99.9])


def test_serialization_round_trip_and_empty_histogram() -> None:
    h = Histogram()
    assert h.percentile(99) == 0
    assert h.percentiles([50, 99]) == {"p50": 0, "p99": 0}
    for v in (5, 500, 50_000, 5_000_000):
        h.record(v, 3)
    again = Histogram.from_dict(h.to_dict())
    assert again.counts == h.counts and again.total == 12 and again.max == 5_000_000
    assert again.percentile(50) == h.percentile(50)
    spectrum = h.spectrum()
    assert spectrum[0] == (0.0, 5)
    assert [v for _, v in spectrum] == sorted(v for _, v in spectrum)
