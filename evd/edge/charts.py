"""The top-tracks charts every worker answers from: built from the ``charts`` stream.

Each processor emits, per partition, the rows of the chart windows that closed
(``ChartsBatch``: rows keyed by (window_start, country, track_id, partition),
and ``closed_until``). Every worker reads every partition of that stream (an
anonymous consumer from the oldest retained record), so any worker answers
``GET /v1/charts/top-tracks`` the same way, whatever the number of workers, and
after a restart. A row read twice (a processor replaying after a crash) sets
the same value again: rows are stored by their key, never added up.

Rows are revised: a late play (within ``processing.allowed_lateness_ms``)
re-emits the row of an already closed window with ``revision`` + 1 and the new
count. Per key the view keeps the highest revision read and applies a row only
when its revision is at least that one, so an answer holds the latest counts
and a replayed older revision never lowers one.

Query: ``window_end`` is the end of the latest window closed on every
partition (the minimum of the partitions' ``closed_until``); the answer sums
the windows in [window_end - window, window_end).
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from urllib.parse import parse_qsl

import msgspec
from cachetools import LRUCache

from evd.config import Config
from evd.core.log import Consumer, InvalidOffset, TopicPartition
from evd.core.log import records as rec
from evd.core.log.streams import Stream
from evd.core.schema import COUNTRIES, ChartsBatch

__all__ = ["ChartsView", "QueryError", "TopTracks", "parse_query"]

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
DEFAULT_LIMIT = 10
_WINDOW_RE = re.compile(r"([1-9][0-9]{0,6})(s|m|h|d)")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: Charts records one fetch takes at most.
FETCH_BYTES = 1 << 20
#: Distinct top-tracks questions answered from memory between two records of the
#: charts stream (country x window x limit): bounds what a client can make us keep.
ANSWER_CACHE_SIZE = 256


class QueryError(ValueError):
    """A bad query parameter; the message starts with the parameter's name."""


class Track(msgspec.Struct):
    track_id: str
    plays: int


class TopTracks(msgspec.Struct):
    """The body of ``GET /v1/charts/top-tracks``."""

    country: str | None
    window: str
    window_start: int | None
    window_end: int | None
    tracks: list[Track]


class Query(msgspec.Struct, frozen=True):
    country: str | None
    window: str
    window_ms: int
    limit: int


def parse_query(query: str, window_ms: int, retention_ms: int) -> Query:
    """Validate the query string; QueryError names the bad parameter."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in ("country", "window", "limit"):
            raise QueryError(f"{name}: unknown parameter (use country, window, limit)")
        if name in params:
            raise QueryError(f"{name}: given more than once")
        params[name] = value
    country = params.get("country")
    if country is not None and country not in COUNTRIES:
        raise QueryError("country: expected an ISO 3166-1 alpha-2 code such as US")
    window = params.get("window", "1m")
    match = _WINDOW_RE.fullmatch(window)
    if match is None:
        raise QueryError("window: expected a number and a unit (s, m, h, d), such as 5m or 24h")
    span = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if span % window_ms:
        raise QueryError(f"window: must be a multiple of charts.window_s ({window_ms // 1000}s)")
    if span > retention_ms:
        raise QueryError(f"window: at most charts.retention_s ({retention_ms // 1000}s)")
    raw_limit = params.get("limit", str(DEFAULT_LIMIT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise QueryError(f"limit: expected an integer from 1 to {MAX_LIMIT}")
    return Query(country, window, span, int(raw_limit))


class ChartsView:
    """Closed chart windows of every partition, kept for ``charts.retention_s``."""

    def __init__(self, partitions: int, window_ms: int, retention_ms: int) -> None:
        self.partitions = partitions
        self.window_ms = window_ms
        self.retention_ms = retention_ms
        #: (window_start, partition) -> (country, track_id) -> (plays, revision)
        #: of the highest revision read.
        self._rows: dict[tuple[int, int], dict[tuple[str | None, str], tuple[int, int]]] = {}
        #: window_start -> country -> track_id -> plays over partitions (country
        #: None: events without geo); kept in step with _rows.
        self._merged: dict[int, dict[str | None, Counter[str]]] = {}
        self.closed_until: dict[int, int] = {}
        #: Answers since the last record, least recently asked dropped first.
        self._cache: LRUCache[Query, TopTracks] = LRUCache(maxsize=ANSWER_CACHE_SIZE)

    def apply(self, batch: ChartsBatch) -> None:
        """Take one record of the charts stream (idempotent): a row replaces its
        key's count unless an older revision than the one held."""
        p = batch.partition
        for row in batch.rows:
            rows = self._rows.setdefault((row.window_start, p), {})
            key = (row.country, row.track_id)
            plays, revision = rows.get(key, (0, -1))
            if row.revision < revision:
                continue
            rows[key] = (row.plays, row.revision)
            delta = row.plays - plays
            if delta:
                merged = self._merged.setdefault(row.window_start, defaultdict(Counter))
                merged[row.country][row.track_id] += delta
        if batch.closed_until > self.closed_until.get(p, -1):
            self.closed_until[p] = batch.closed_until
        self._cache.clear()
        self._expire()

    def window_end(self) -> int | None:
        """End of the latest window closed on every partition (None: not yet)."""
        if len(self.closed_until) < self.partitions:
            return None
        return min(self.closed_until.values())

    def _expire(self) -> None:
        newest = max(self.closed_until.values(), default=None)
        if newest is None:
            return
        oldest = newest - self.retention_ms
        for start in [s for s in self._merged if s < oldest]:
            del self._merged[start]
        for key in [k for k in self._rows if k[0] < oldest]:
            del self._rows[key]

    def top(self, query: Query) -> TopTracks:
        """The answer to ``query`` (cached until the next record)."""
        cached = self._cache.get(query)
        if cached is not None:
            return cached
        end = self.window_end()
        if end is None:
            return TopTracks(query.country, query.window, None, None, [])
        start = end - query.window_ms
        totals: Counter[str] = Counter()
        for window_start in range(start, end, self.window_ms):
            merged = self._merged.get(window_start)
            if merged is None:
                continue
            if query.country is not None:
                totals.update(merged.get(query.country, Counter()))
            else:
                for counts in merged.values():
                    totals.update(counts)
        ranked = sorted(((-n, t) for t, n in totals.items() if n > 0))[: query.limit]
        answer = TopTracks(
            query.country, query.window, start, end, [Track(t, -n) for n, t in ranked]
        )
        self._cache[query] = answer
        return answer

    async def follow(self, consumer: Consumer) -> None:
        """Apply the charts stream as it grows, until cancelled."""
        consumer.assign([TopicPartition(Stream.CHARTS, p) for p in range(self.partitions)])
        while True:
            try:
                records = await consumer.fetch(FETCH_BYTES, 5.0)
            except InvalidOffset as exc:
                log.error("charts view: %s; reading the charts stream again from its start", exc)
                for sublog in consumer.positions():
                    consumer.seek_to_beginning(sublog)
                continue
            for record in records:
                value = rec.decode(record.payload, Stream.CHARTS)
                if isinstance(value, ChartsBatch):
                    self.apply(value)


def make_view(cfg: Config) -> ChartsView:
    """The view ``cfg`` describes (partitions, window, retention)."""
    return ChartsView(
        cfg.log.partitions, cfg.charts.window_s * 1000, cfg.charts.retention_s * 1000
    )

