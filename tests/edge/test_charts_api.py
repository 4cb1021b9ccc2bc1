"""GET /v1/charts/top-tracks: parameter checks, the merge of partitions, and the
whole path through real servers (charts stream -> every worker's view), across
restarts and worker counts."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from evdtest import EvdServer, ServerFactory, batch, make_event, post, request, track_id

from evd.core.schema import ChartRow, ChartsBatch
from evd.edge.charts import ANSWER_CACHE_SIZE, ChartsView, QueryError, parse_query

pytestmark = pytest.mark.workers_independent

MIN = 60_000
DAY = 86_400_000


# -- the query string ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("country=us", "country"),
        ("country=XX", "country"),
        ("window=0m", "window"),
        ("window=90s", "window"),  # not a multiple of the 60 s window
        ("window=25h", "window"),  # beyond charts.retention_s
        ("window=1w", "window"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=5&limit=6", "limit"),
        ("top=5", "top"),
    ],
)
def test_a_bad_parameter_is_named(query: str, param: str) -> None:
    with pytest.raises(QueryError, match=rf"^{param}: "):
        parse_query(query, MIN, DAY)


def test_defaults_and_units() -> None:
    q = parse_query("", MIN, DAY)
    assert (q.country, q.window, q.window_ms, q.limit) == (None, "1m", MIN, 10)
    assert parse_query("window=24h&limit=1000&country=US", MIN, DAY).window_ms == DAY
    assert parse_query("window=1d", MIN, DAY).window_ms == DAY
    assert parse_query("window=120s", MIN, DAY).window_ms == 2 * MIN


# -- the view: merge over partitions, idempotent rows, ordering ---------------------------


def rows(p: int, closed: int, *items: tuple[int, str | None, str, int]) -> ChartsBatch:
    return ChartsBatch(p, closed, [ChartRow(w, c, t, n) for w, c, t, n in items])


def test_the_latest_window_closed_on_every_partition_is_answered() -> None:
    view = ChartsView(2, MIN, DAY)
    q = parse_query("window=1m", MIN, DAY)
    assert view.top(q).window_end is None  # nothing closed yet
    view.apply(rows(0, 2 * MIN, (MIN, "US", "a", 3), (MIN, "SE", "b", 5)))
    assert view.top(q).window_end is None  # partition 1 has not closed a window
    view.apply(rows(1, MIN, (0, "US", "a", 1)))
    answer = view.top(q)
    assert (answer.window_start, answer.window_end) == (0, MIN)
    assert [(t.track_id, t.plays) for t in answer.tracks] == [("a", 1)]
    view.apply(rows(1, 3 * MIN, (MIN, "US", "c", 3), (2 * MIN, "US", "z", 9)))
    answer = view.top(q)  # window_end = min(2m, 3m): the 1m..2m window
    assert (answer.window_start, answer.window_end) == (MIN, 2 * MIN)
    # plays descending, then track_id; partitions merged
    assert [(t.track_id, t.plays) for t in answer.tracks] == [("b", 5), ("a", 3), ("c", 3)]
    us = view.top(parse_query("country=US&window=2m", MIN, DAY))
    assert [(t.track_id, t.plays) for t in us.tracks] == [("a", 4), ("c", 3)]
    assert view.top(parse_query("limit=1", MIN, DAY)).tracks[0].track_id == "b"


def test_a_replayed_row_is_not_counted_twice() -> None:
    view = ChartsView(1, MIN, DAY)
    for _ in range(3):  # a processor replaying after a crash emits the same rows again
        view.apply(rows(0, MIN, (0, "US", "a", 4), (0, None, "a", 1)))
    q = parse_query("", MIN, DAY)
    assert [(t.track_id, t.plays) for t in view.top(q).tracks] == [("a", 5)]
    assert view.top(parse_query("country=US", MIN, DAY)).tracks[0].plays == 4


def revisions(p: int, closed: int, *items: tuple[int, str | None, str, int, int]) -> ChartsBatch:
    return ChartsBatch(p, closed, [ChartRow(w, c, t, n, r) for w, c, t, n, r in items])


def test_the_latest_revision_of_a_row_is_answered() -> None:
    view = ChartsView(2, MIN, DAY)
    view.apply(rows(0, MIN, (0, "US", "a", 4), (0, "US", "b", 3)))
    view.apply(rows(1, MIN, (0, "US", "a", 1)))
    q = parse_query("", MIN, DAY)

    def answer() -> list[tuple[str, int]]:
        return [(t.track_id, t.plays) for t in view.top(q).tracks]

    assert answer() == [("a", 5), ("b", 3)]
    # Late plays revise the closed window: the counts are replaced, not added.
    view.apply(revisions(0, MIN, (0, "US", "b", 6, 1), (0, None, "c", 2, 0)))
    assert answer() == [("b", 6), ("a", 5), ("c", 2)]
    view.apply(revisions(0, MIN, (0, "US", "b", 7, 2)))
    assert answer() == [("b", 7), ("a", 5), ("c", 2)]
    # A replay of older revisions (a processor or this view reading again) and of
    # the latest one change nothing.
    for _ in range(2):
        view.apply(revisions(0, MIN, (0, "US", "b", 3, 0), (0, "US", "a", 4, 0)))
        view.apply(revisions(0, 2 * MIN, (0, "US", "b", 6, 1), (0, None, "c", 2, 0)))
        view.apply(revisions(0, MIN, (0, "US", "b", 7, 2)))
    assert answer() == [("b", 7), ("a", 5), ("c", 2)]
    assert view.top(parse_query("country=US", MIN, DAY)).tracks[0].plays == 7
    assert view._rows[0, 0][("US", "b")] == (7, 2)


def test_windows_older_than_the_retention_are_forgotten() -> None:
    view = ChartsView(1, MIN, 2 * MIN)
    view.apply(rows(0, MIN, (0, "US", "old", 1)))
    view.apply(rows(0, 10 * MIN, (9 * MIN, "US", "new", 1)))
    assert view.top(parse_query("window=2m", MIN, 2 * MIN)).tracks[0].track_id == "new"
    assert (0, 0) not in view._rows


def test_answers_are_kept_for_a_bounded_set_of_questions_until_the_next_record() -> None:
    view = ChartsView(1, MIN, DAY)
    view.apply(rows(0, MIN, (0, "US", "a", 4)))
    questions = [parse_query(f"limit={n}", MIN, DAY) for n in range(1, ANSWER_CACHE_SIZE + 50)]
    first = view.top(questions[0])
    assert view.top(questions[0]) is first  # answered from memory
    for q in questions:
        view.top(q)
    assert len(view._cache) == ANSWER_CACHE_SIZE  # the least recently asked went first
    assert view.top(questions[-1]) is view.top(questions[-1])
    view.apply(rows(0, 2 * MIN, (MIN, "US", "b", 1)))
    assert len(view._cache) == 0  # a new record makes every answer stale
    assert view.top(questions[0]) is not first


# -- through real servers ---------------------------------------------------------------

FAST = {
    "log": {"partitions": 4},
    "charts": {"window_s": 1},
    "processing": {"idle_timeout_ms": 500, "session_gap_ms": 2000},
    "snapshot": {"interval_s": 0.5},
}


def now_iso(offset_ms: int = 0) -> str:
    return datetime.fromtimestamp(time.time() + offset_ms / 1000, UTC).isoformat()


def top(server: EvdServer, query: str) -> Any:
    resp = request(server.port, "GET", f"/v1/charts/top-tracks?{query}")
    assert resp.status == 200, resp
    return resp.json()


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def post_plays(server: EvdServer, plays: dict[str, int], prefix: str) -> None:
    """Plays of ``track_id(n)`` per country code, now, spread over many users."""
    events = []
    for country, n in plays.items():
        for i in range(n):
            events.append(make_event(
                f"{prefix}-{country}-{i}", user_id=f"{prefix}-user-{country}-{i}",
                timestamp=now_iso(), track_id=track_id(len(country) + ord(country[0])),
                geo={"country": country},
            ))
    assert post(server.port, batch(events)).status == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_top_tracks_through_the_server_survive_a_restart(
    servers: ServerFactory, workers: int
) -> None:
    server = servers.start(FAST, args=["--workers", str(workers)])
    post_plays(server, {"US": 7, "SE": 3}, "a")
    answer = wait_for(lambda: top(server, "window=1h") if top(server, "window=1h")["tracks"] else None)
    assert answer, "no chart rows reached the API"
    assert answer["window"] == "1h" and answer["country"] is None
    assert answer["window_end"] - answer["window_start"] == 3_600_000
    assert [t["plays"] for t in answer["tracks"]] == [7, 3]
    us = top(server, "window=1h&country=US")
    assert us["country"] == "US" and [t["plays"] for t in us["tracks"]] == [7]
    bad = request(server.port, "GET", "/v1/charts/top-tracks?window=7x")
    assert bad.status == 400 and bad.json()["error"].startswith("window: ")
    assert request(server.port, "POST", "/v1/charts/top-tracks", b"").status == 405
    assert server.stop() == 0

    again = servers.start(FAST, data_dir=server.data_dir, args=["--workers", str(3 - workers)])
    # Built from the charts stream, so the answer is back after a restart, with
    # any number of workers, before any new event.
    restored = wait_for(lambda: top(again, "window=1h")["tracks"])
    assert [t["plays"] for t in restored] == [7, 3]
