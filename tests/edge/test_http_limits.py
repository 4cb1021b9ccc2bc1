"""Bounds a client cannot push past, against a real server: slow headers, slow
bodies and idle keep-alive connections are closed; the per-key rate limit answers
429 and a full group-commit queue sheds with 503, both with Retry-After."""

from __future__ import annotations

import time
from typing import Any

import pytest
from evdtest import (
    EvdServer,
    RawConn,
    ServerFactory,
    batch,
    closed_or_408,
    make_event,
    post,
    raw_post,
)

from evd.logtool import iter_stream

TIMEOUT_S = 1.0
#: How long a test waits for the server to act on a TIMEOUT_S deadline: the
#: timeout, the server's 0.25 s sweep, and slack for a loaded machine.
CLOSE_WITHIN_S = TIMEOUT_S + 5.0

TIGHT: dict[str, Any] = {
    "limits": {
        "header_timeout_s": TIMEOUT_S,
        "body_timeout_s": TIMEOUT_S,
        "keepalive_timeout_s": TIMEOUT_S,
    },
    # One byte waiting for a flush is already "full": the second append taken
    # before the group commit runs is shed.
    "log": {"max_pending_bytes": 1},
}

RATE: dict[str, Any] = {
    # A slow refill (5 events in 50 s): however long the two POSTs below take apart,
    # the second finds the bucket still empty.
    "limits": {"rate_limit_events_per_s": 0.1, "rate_limit_burst": 5},
    "auth": {"keys": ["key-a", "key-b"]},
}


@pytest.fixture(scope="module")
def tight(module_servers: ServerFactory) -> EvdServer:
    return module_servers.start(TIGHT)


@pytest.fixture(scope="module")
def rated(module_servers: ServerFactory) -> EvdServer:
    return module_servers.start(RATE)


def logged_ids(server: EvdServer) -> set[str]:
    return {e["event_id"] for e in iter_stream(server.data_dir, "raw")}


def trickle(conn: RawConn, pieces: list[bytes], every_s: float, within_s: float) -> bytes | None:
    """Send ``pieces`` one by one, ``every_s`` apart, until the server closes.

    What the server sent before closing, or None if it was still open after ``within_s``.
    """
    deadline = time.monotonic() + within_s
    for piece in pieces:
        try:
            conn.send(piece)
        except OSError:  # reset by the server
            return conn.buf
        sent = conn.wait_closed(every_s)
        if sent is not None:
            return sent
        if time.monotonic() > deadline:
            return None
    return conn.wait_closed(max(0.0, deadline - time.monotonic()))


def test_request_split_across_sends_within_the_timeouts_is_served(tight: EvdServer) -> None:
    # Negative control for the slow-client tests: a pause shorter than the
    # timeouts does not close the connection.
    data = raw_post(batch([make_event("tight-ok-1")]))
    head_end = data.index(b"\r\n\r\n")
    with RawConn(tight.port) as conn:
        conn.send(data[:20])
        time.sleep(0.1)
        conn.send(data[20 : head_end + 4])
        time.sleep(0.1)
        conn.send(data[head_end + 4 :])
        assert conn.read_response().status == 200
        conn.send(raw_post(batch([make_event("tight-ok-2")])))
        assert conn.read_response().status == 200


SLOW_REQUEST_LINE = [bytes([c]) for c in b"POST /v1/events?" + b"q" * 200]
SLOW_HEADERS = [b"POST /v1/events HTTP/1.1\r\nHost: test\r\n"] + [
    b"X-Slow-%d: v\r\n" % i for i in range(200)
]


@pytest.mark.parametrize(
    "pieces", [SLOW_REQUEST_LINE, SLOW_HEADERS], ids=["request-line", "header-lines"]
)
def test_slowloris_headers_are_cut_off(tight: EvdServer, pieces: list[bytes]) -> None:
    started = time.monotonic()
    with RawConn(tight.port) as conn:
        sent = trickle(conn, pieces, every_s=0.1, within_s=CLOSE_WITHIN_S)
    assert closed_or_408(sent), sent
    assert time.monotonic() - started < CLOSE_WITHIN_S


def test_slow_body_is_cut_off(tight: EvdServer) -> None:
    body = batch([make_event("tight-slow-body")])
    data = raw_post(body)
    head_len = len(data) - len(body)
    with RawConn(tight.port) as conn:
        pieces = [data[:head_len]] + [body[i : i + 1] for i in range(len(body))]
        sent = trickle(conn, pieces, every_s=0.1, within_s=CLOSE_WITHIN_S)
    assert closed_or_408(sent), sent
    assert "tight-slow-body" not in logged_ids(tight)


def test_idle_keep_alive_connection_is_closed(tight: EvdServer) -> None:
    with RawConn(tight.port) as conn:
        conn.send(raw_post(batch([make_event("tight-idle-1")])))
        assert conn.read_response().status == 200
        assert conn.wait_closed(CLOSE_WITHIN_S) == b""


def test_connection_that_never_sends_is_closed(tight: EvdServer) -> None:
    with RawConn(tight.port) as conn:
        assert conn.wait_closed(CLOSE_WITHIN_S) == b""


def test_full_flush_queue_sheds_with_503(tight: EvdServer) -> None:
    # Five POSTs in one send reach the server in one read: the first append
    # fills the (1-byte) pending bound before its group commit can run.
    reqs = [raw_post(batch([make_event(f"shed-{i}", user_id=f"u{i}")])) for i in range(5)]
    with RawConn(tight.port) as conn:
        conn.send(b"".join(reqs))
        resps = [conn.read_response() for _ in reqs]
    statuses = [r.status for r in resps]
    assert statuses[0] == 200 and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    logged = logged_ids(tight)
    for i, r in enumerate(resps):
        if r.status == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert "overloaded" in r.json()["error"]
            assert f"shed-{i}" not in logged
        else:
            assert f"shed-{i}" in logged
    # Once the queue drained the server takes appends again (the processor's own
    # appends, of the events just accepted, share the queue: wait for them).
    deadline = time.monotonic() + 10
    while (status := post(tight.port, batch([make_event("shed-after")])).status) == 503:
        assert time.monotonic() < deadline, "the flush queue never drained"
        time.sleep(0.05)
    assert status == 200


def test_rate_limit_is_429_with_retry_after_per_key(rated: EvdServer) -> None:
    five = [make_event(f"rl-a-{i}", user_id=f"u{i}") for i in range(5)]
    assert post(rated.port, batch(five), key="key-a").status == 200
    more = [make_event(f"rl-a-more-{i}", user_id=f"u{i}") for i in range(5)]
    r = post(rated.port, batch(more), key="key-a")
    assert r.status == 429
    assert int(r.headers["retry-after"]) >= 1
    assert "rate limit" in r.json()["error"]
    # Another key has its own bucket.
    assert post(rated.port, batch([make_event("rl-b-1")]), key="key-b").status == 200
    logged = logged_ids(rated)
    assert {f"rl-a-{i}" for i in range(5)} <= logged
    assert not logged & {f"rl-a-more-{i}" for i in range(5)}
