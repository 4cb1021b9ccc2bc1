"""A small HDR-style log-linear histogram of integer values (latencies in microseconds).

Values below ``2**SUB_BITS`` get a bucket each; above that every power-of-two range is
split into ``2**(SUB_BITS-1)`` equal buckets, so a bucket is never wider than 1/128 of
the values it holds (about two significant digits; the midpoint is within 0.4%).
Histograms are sparse (a dict of bucket index to count), so they merge by adding
counts, serialize to a few hundred pairs, and are cheap to keep per time interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUB_BITS = 8
_SUB_COUNT = 1 << SUB_BITS
_HALF = _SUB_COUNT >> 1


def bucket_index(value: int) -> int:
    """Return the bucket holding ``value`` (negative values count as 0)."""
    if value < _SUB_COUNT:
        return max(0, value)
    shift = value.bit_length() - SUB_BITS
    return shift * _HALF + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """Return the inclusive ``(lowest, highest)`` values that map to bucket ``index``."""
    if index < _SUB_COUNT:
        return index, index
    shift = (index - _HALF) // _HALF
    sub = index - shift * _HALF
    low = sub << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of non-negative integer values in log-linear buckets; mergeable.

    ``percentile`` answers with the highest value of the bucket that holds the
    requested rank (clipped to the exact recorded min/max), the same convention as
    HdrHistogram, so a reported p99 is never lower than the true one by more than
    the bucket width.
    """

    __slots__ = ("counts", "max", "min", "sum", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.min = 0
        self.max = 0
        self.sum = 0

    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` observations of ``value``."""
        value = max(value, 0)
        idx = bucket_index(value)
        counts = self.counts
        counts[idx] = counts.get(idx, 0) + count
        if self.total == 0:
            self.min = self.max = value
        elif value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value
        self.total += count
        self.sum += value * count

    def merge(self, other: Histogram) -> None:
        """Add every observation of ``other`` to this histogram."""
        if other.total == 0:
            return
        counts = self.counts
        for idx, n in other.counts.items():
            counts[idx] = counts.get(idx, 0) + n
        if self.total == 0:
            self.min, self.max = other.min, other.max
        else:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def mean(self) -> float:
        """Return the exact mean of the recorded values (0.0 when empty)."""
        return self.sum / self.total if self.total else 0.0

    def percentile(self, pct: float) -> int:
        """Return the value at percentile ``pct`` (0..100); 0 when empty."""
        if self.total == 0:
            return 0
        if pct <= 0:
            return self.min
        if pct >= 100:
            return self.max
        rank = _rank(pct, self.total)
        seen = 0
        for idx in sorted(self.counts):
            seen += self.counts[idx]
            if seen >= rank:
                high = bucket_bounds(idx)[1]
                return max(self.min, min(high, self.max))
        return self.max

    def percentiles(self, pcts: Iterable[float]) -> dict[str, int]:
        """Return ``{"p50": v, ...}`` for each requested percentile in one pass."""
        wanted = sorted(pcts)
        out: dict[str, int] = {}
        if not wanted:
            return out
        if self.total == 0:
            return {_pct_key(p): 0 for p in wanted}
        order = sorted(self.counts)
        seen = 0
        pos = 0
        for pct in wanted:
            if pct >= 100:
                out[_pct_key(pct)] = self.max
                continue
            rank = _rank(pct, self.total)
            while seen < rank and pos < len(order):
                seen += self.counts[order[pos]]
                pos += 1
            idx = order[pos - 1] if pos else order[0]
            high = bucket_bounds(idx)[1]
            out[_pct_key(pct)] = max(self.min, min(high, self.max))
        return out

    def to_dict(self) -> dict[str, object]:
        """Serialize to plain JSON-able data; ``from_dict`` restores it exactly."""
        return {
            "sub_bits": SUB_BITS,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "sum": self.sum,
            "buckets": [[idx, self.counts[idx]] for idx in sorted(self.counts)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Histogram:
        """Rebuild a histogram serialized by ``to_dict``."""
        if data.get("sub_bits", SUB_BITS) != SUB_BITS:
            raise ValueError(
                f"histogram was written with sub_bits={data.get('sub_bits')}, "
                f"this build uses {SUB_BITS}"
            )
        hist = cls()
        buckets = data.get("buckets", [])
        assert isinstance(buckets, list)
        for idx, n in buckets:
            hist.counts[int(idx)] = int(n)
        for name in ("total", "min", "max", "sum"):
            value = data.get(name, 0)
            assert isinstance(value, int)
            setattr(hist, name, value)
        return hist

    def spectrum(self, points_per_decade: int = 10) -> list[tuple[float, int]]:
        """Return ``(percentile, value)`` points spaced evenly in 1/(1-p), for plots."""
        pcts: list[float] = [0.0]
        # Steps of 1/(1-p) from 1 to 10^5 cover p0 .. p99.999.
        for k in range(1, 5 * points_per_decade + 1):
            pcts.append(100.0 * (1.0 - 10 ** (-k / points_per_decade)))
        values = self.percentiles(pcts)
        return [(p, values[_pct_key(p)]) for p in pcts]


def _rank(pct: float, total: int) -> int:
    # 1-based rank ceil(pct% of total) in integer milli-percent, so 99.9 is not
    # turned into 99.8999... by float error and a rank lost.
    milli = round(pct * 1000)
    return max(1, -(-(total * milli) // 100_000))


def _pct_key(pct: float) -> str:
    text = f"{pct:.4f}".rstrip("0").rstrip(".")
    return "p" + text
