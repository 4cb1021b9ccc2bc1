"""The HTTP contract against a real ``python -m evd serve`` process over real sockets:
every status code of POST /v1/events, per-event rejection, duplicates, clock skew,
gzip, pipelining and keep-alive, the operational endpoints."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from evdtest import (
    DEV_KEY,
    EvdServer,
    RawConn,
    ServerFactory,
    batch,
    make_event,
    post,
    raw_get,
    raw_post,
    request,
    seed_bytes,
    track_id,
)

from evd.logtool import iter_stream

HASHED_KEY = "a-key-stored-only-as-its-digest"
MAX_BODY = 64 * 1024
MAX_DECOMPRESSED = 256 * 1024
MAX_EVENTS = 50
MAX_HEADER = 4096

CONFIG: dict[str, Any] = {
    "limits": {
        "max_body_bytes": MAX_BODY,
        "max_decompressed_bytes": MAX_DECOMPRESSED,
        "max_events_per_batch": MAX_EVENTS,
        "max_header_bytes": MAX_HEADER,
    },
    "auth": {"keys": [DEV_KEY, "sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()]},
    "log": {"partitions": 4},
}


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> EvdServer:
    return module_servers.start(CONFIG)


def raw_events(server: EvdServer) -> dict[str, dict[str, Any]]:
    """Events of the raw log by id (the log is read as another process would)."""
    return {e["event_id"]: e for e in iter_stream(server.data_dir, "raw")}


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- 200 -----------------------------------------------------------------------------


def test_seed_event_is_accepted_verbatim_and_logged(server: EvdServer) -> None:
    seed = seed_bytes()
    before = time.time() * 1000
    r = post(server.port, b'{"events": [' + seed + b"]}")
    after = time.time() * 1000
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}

    original = json.loads(seed)
    logged = [
        e for e in iter_stream(server.data_dir, "raw") if e["event_id"] == original["event_id"]
    ]
    assert len(logged) == 1
    record = logged[0]
    for field in ("user_id", "track_id", "context", "playback", "device", "geo"):
        assert record[field] == original[field], field
    assert record["event_type"] == "play"  # no event_type in the seed means play
    assert parse_time(record["timestamp"]) == parse_time(original["timestamp"])
    assert record["skew_ms"] == 0
    assert before - 1000 <= record["received_at"] <= after + 1000


def test_empty_batch_is_accepted(server: EvdServer) -> None:
    r = post(server.port, b'{"events": []}')
    assert (r.status, r.json()) == (200, {"accepted": 0, "duplicates": 0, "rejected": []})


def test_batch_at_the_event_limit_is_accepted(server: EvdServer) -> None:
    events = [make_event(f"at-limit-{i}", user_id=f"u{i}") for i in range(MAX_EVENTS)]
    r = post(server.port, batch(events))
    assert (r.status, r.json()["accepted"]) == (200, MAX_EVENTS)


def test_content_type_parameters_and_identity_encoding_are_accepted(server: EvdServer) -> None:
    r = post(
        server.port,
        batch([make_event("ctype-params-1")]),
        content_type="application/json; charset=utf-8",
        headers={"Content-Encoding": "identity"},
    )
    assert (r.status, r.json()["accepted"]) == (200, 1)


# -- 400 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"events": [', id="truncated-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[1, 2]", id="array-not-envelope"),
        pytest.param(b"{}", id="no-events"),
        pytest.param(b'{"events": {"a": 1}}', id="events-object"),
        pytest.param(b'{"events": "x"}', id="events-string"),
        pytest.param(b'{"events": [], "sent_at": "yesterday"}', id="bad-sent_at"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-too-deep"),
        pytest.param(b'{"events": [{"context": ' + b"[" * 5000 + b"]" * 5000 + b"}]}",
                     id="event-nested-too-deep"),
    ],
)
def test_body_that_is_not_json_or_not_the_envelope_is_400(server: EvdServer, body: bytes) -> None:
    r = post(server.port, body)
    assert r.status == 400, r.body
    assert isinstance(r.json()["error"], str)


# -- 401 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer wrong-key", id="wrong-key"),
        pytest.param("Bearer ", id="empty-key"),
        pytest.param(DEV_KEY, id="no-scheme"),
        pytest.param("Basic ZXZkLWRldi1rZXk6", id="basic"),
        pytest.param(
            "Bearer sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest(), id="digest-as-key"
        ),
    ],
)
def test_missing_or_bad_key_is_401(server: EvdServer, authorization: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    r = request(server.port, "POST", "/v1/events", batch([make_event("never-1")]), headers)
    assert r.status == 401
    assert "error" in r.json()
    assert "never-1" not in raw_events(server)


def test_sha256_configured_key_authorizes_the_plain_key(server: EvdServer) -> None:
    r = post(server.port, batch([make_event("hashed-key-1")]), key=HASHED_KEY)
    assert (r.status, r.json()["accepted"]) == (200, 1)


def test_bearer_scheme_is_case_insensitive(server: EvdServer) -> None:
    r = post(server.port, batch([make_event("bearer-case-1")]), key=None,
             headers={"Authorization": f"bearer {DEV_KEY}"})
    assert r.status == 200


# -- 413 -----------------------------------------------------------------------------


def test_content_length_over_max_body_is_413_before_the_body(server: EvdServer) -> None:
    head = raw_post(b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % (MAX_BODY + 1))
    with RawConn(server.port) as conn:
        conn.send(head)  # the body never comes: the server must not wait for it
        r = conn.read_response()
        assert r.status == 413
        assert r.headers.get("connection") == "close"
        assert conn.wait_closed(5) is not None


def test_chunked_body_over_max_body_is_413(server: EvdServer) -> None:
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {DEV_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
    n_chunks = MAX_BODY // 8192 + 1
    with RawConn(server.port) as conn:
        conn.send(head + chunk * n_chunks)
        r = conn.read_response()
        assert r.status == 413
        assert "max_body_bytes" in r.json()["error"]


def test_chunked_body_under_the_limit_is_accepted(server: EvdServer) -> None:
    body = batch([make_event("chunked-ok-1")])
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {DEV_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]))
    with RawConn(server.port) as conn:
        conn.send(head + chunks + b"0\r\n\r\n")
        r = conn.read_response()
    assert (r.status, r.json()["accepted"]) == (200, 1)


def test_decompressed_body_over_limit_is_413(server: EvdServer) -> None:
    body = b'{"events": [], "pad": "' + b"x" * MAX_DECOMPRESSED + b'"}'
    compressed = gzip.compress(body)
    assert len(compressed) < MAX_BODY
    r = post(server.port, compressed, headers={"Content-Encoding": "gzip"})
    assert r.status == 413
    assert "decompressed" in r.json()["error"]


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 50 KB of gzip that inflates to 48 MiB of zeros."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [deflater.compress(block) for _ in range(48)]
    parts.append(deflater.flush())
    return b"".join(parts)


def test_gzip_bomb_is_413_without_inflating_it(server: EvdServer, gzip_bomb: bytes) -> None:
    assert len(gzip_bomb) < MAX_BODY
    started = time.monotonic()
    r = post(server.port, gzip_bomb, headers={"Content-Encoding": "gzip"})
    assert r.status == 413
    # Generous: the point is that it answers, not how fast (see test_edge_units for
    # the memory bound of gunzip itself).
    assert time.monotonic() - started < 10
    assert request(server.port, "GET", "/healthz").status == 200


@pytest.mark.parametrize("one_invalid", [False, True], ids=["all-valid", "with-invalid"])
def test_too_many_events_is_413(server: EvdServer, one_invalid: bool) -> None:
    events: list[Any] = [
        make_event(f"too-many-{one_invalid}-{i}", user_id=f"u{i}") for i in range(MAX_EVENTS + 1)
    ]
    if one_invalid:
        events[3] = {"event_id": "broken"}
    r = post(server.port, batch(events))
    assert r.status == 413
    assert "max_events_per_batch" in r.json()["error"]
    assert f"too-many-{one_invalid}-0" not in raw_events(server)


# -- 415 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, encoding",
    [
        ("text/plain", None),
        (None, None),
        ("application/x-www-form-urlencoded", None),
        ("application/json", "br"),
        ("application/json", "deflate"),
    ],
)
def test_wrong_content_type_or_encoding_is_415(
    server: EvdServer, content_type: str | None, encoding: str | None
) -> None:
    headers = {"Content-Encoding": encoding} if encoding else {}
    r = post(server.port, batch([make_event("never-415")]), content_type=content_type,
             headers=headers)
    assert r.status == 415
    assert "error" in r.json()


# -- 404 / 405 and the operational endpoints ----------------------------------------------


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nope", 404),
        ("POST", "/v1/events/extra", 404),
        ("GET", "/v1/events", 405),
        ("PUT", "/v1/events", 405),
        ("POST", "/healthz", 405),
        ("DELETE", "/metrics", 405),
    ],
)
def test_unknown_path_is_404_and_wrong_method_is_405(
    server: EvdServer, method: str, path: str, status: int
) -> None:
    headers = {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"}
    r = request(server.port, method, path, b"{}", headers)
    assert r.status == status


def test_healthz_and_readyz(server: EvdServer) -> None:
    assert request(server.port, "GET", "/healthz").status == 200
    r = request(server.port, "GET", "/readyz")
    assert (r.status, r.json()["ready"]) == (200, True)


def test_metrics_are_prometheus_text(server: EvdServer) -> None:
    assert post(server.port, batch([make_event("metrics-1")])).status == 200
    r = request(server.port, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    for name in (
        "evd_events_accepted_total",
        "evd_events_received_total",
        "evd_http_requests_total",
        "evd_log_append_seconds",
        "evd_http_connections",
    ):
        assert name in text, name
    accepted = [line for line in text.splitlines() if line.startswith("evd_events_accepted_total ")]
    assert float(accepted[0].split()[1]) >= 1
    assert 'evd_http_requests_total{path="/v1/events",status="200"}' in text


# -- per-event rejection, duplicates, skew ---------------------------------------------------


def test_invalid_events_are_rejected_by_index_and_dead_lettered(server: EvdServer) -> None:
    ev = make_event
    events: list[Any] = [
        ev("rj-ok-0"),
        ev("rj-1", geo={"country": "ZZ"}),
        ev("rj-2", playback={"position_ms": 300_000, "duration_ms": 200_000}),
        ev("rj-3", track_id="spotify:track:short"),
        ev("rj-4", track_id="spotify:album:" + track_id(7)[14:]),
        ev("rj-5", timestamp="not a time"),
        ev("rj-6", timestamp="2024-05-01T12:00:00"),  # no offset
        ev("", user_id="rj-7"),
        {k: v for k, v in ev("rj-8").items() if k != "user_id"},
        ev("rj-ok-9"),
        42,
        ev("rj-11", playback={"position_ms": -5, "duration_ms": 200_000}),
        ev("rj-12", event_type="stop"),
        ev("x" * 65),
        ev("rj-14", geo={"country": "USA"}),
    ]
    expected = [
        (1, "rj-1", "geo.country"),
        (2, "rj-2", "playback.position_ms"),
        (3, "rj-3", "track_id"),
        (4, "rj-4", "track_id"),
        (5, "rj-5", "timestamp"),
        (6, "rj-6", "timestamp"),
        (7, "", "event_id"),
        (8, "rj-8", "user_id"),
        (10, None, None),
        (11, "rj-11", "playback.position_ms"),
        (12, "rj-12", "event_type"),
        (13, "x" * 65, "event_id"),
        (14, "rj-14", "geo.country"),
    ]
    r = post(server.port, batch(events))
    assert r.status == 200, r.body
    result = r.json()
    assert (result["accepted"], result["duplicates"]) == (2, 0)
    got = [(x["index"], x["event_id"], x["error"]) for x in result["rejected"]]
    assert [(i, eid) for i, eid, _ in got] == [(i, eid) for i, eid, _ in expected]
    for (index, _, error), (_, _, path) in zip(got, expected, strict=True):
        assert isinstance(error, str) and error
        if path is not None:
            assert error.startswith(f"{path}:"), (index, error)
    assert "missing" in {i: e for i, _, e in got}[8]

    logged = raw_events(server)
    assert {"rj-ok-0", "rj-ok-9"} <= logged.keys()
    assert not any(eid in logged for _, eid, _ in expected if eid)

    letters = list(iter_stream(server.data_dir, "dead_letter"))
    for index, _, error in got:
        matches = [
            d for d in letters
            if d["index"] == index and d["error"] == error and d["event"] == events[index]
        ]
        assert len(matches) == 1, (index, error)


def test_duplicate_ids_in_a_batch_and_across_requests_are_counted(server: EvdServer) -> None:
    a, b, c = (make_event(f"dup-{x}", user_id=f"dup-user-{x}") for x in "abc")
    # One connection, so one worker: the edge remembers the ids its own worker
    # accepted (the processor's dedup window is the host-wide one).
    with RawConn(server.port) as conn:
        conn.send(raw_post(batch([a, a, b])))
        r1 = conn.read_response()
        assert r1.json() == {"accepted": 2, "duplicates": 1, "rejected": []}
        conn.send(raw_post(batch([a, c])))
        r2 = conn.read_response()
        assert r2.json() == {"accepted": 1, "duplicates": 1, "rejected": []}
        # The per-event path (a batch with an invalid event) counts duplicates too.
        conn.send(raw_post(batch([b, {"event_id": "dup-invalid"}])))
        r3 = conn.read_response()
    result = r3.json()
    assert (result["accepted"], result["duplicates"], len(result["rejected"])) == (0, 1, 1)

    logged = [e["event_id"] for e in iter_stream(server.data_dir, "raw")]
    assert (logged.count("dup-a"), logged.count("dup-b"), logged.count("dup-c")) == (1, 1, 1)


def _rfc3339(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    "offset_s, expected_skew_ms",
    [
        pytest.param(-7200, 7_200_000, id="client-2h-behind"),
        pytest.param(3600, -3_600_000, id="client-1h-ahead"),
        pytest.param(-5, 0, id="within-threshold"),
        pytest.param(None, 0, id="no-sent_at"),
    ],
)
def test_sent_at_skew_correction(
    server: EvdServer, offset_s: int | None, expected_skew_ms: int
) -> None:
    event_id = f"skew-{offset_s}"
    envelope = {}
    if offset_s is not None:
        envelope["sent_at"] = _rfc3339(datetime.now(UTC) + timedelta(seconds=offset_s))
    event = make_event(event_id)
    assert post(server.port, batch([event], **envelope)).status == 200
    record = raw_events(server)[event_id]
    # The request's own latency adds to the measured skew; the threshold is 60 s.
    assert abs(record["skew_ms"] - expected_skew_ms) < 30_000
    if expected_skew_ms == 0:
        assert record["skew_ms"] == 0
    assert parse_time(record["timestamp"]) == parse_time(event["timestamp"])  # original kept


# -- gzip ------------------------------------------------------------------------------


def test_gzip_body_is_accepted(server: EvdServer) -> None:
    events = [make_event(f"gz-{i}", user_id=f"gz-user-{i}") for i in range(5)]
    r = post(server.port, gzip.compress(batch(events)), headers={"Content-Encoding": "gzip"})
    assert (r.status, r.json()["accepted"]) == (200, 5)
    assert {f"gz-{i}" for i in range(5)} <= raw_events(server).keys()


def _corrupt_crc(data: bytes) -> bytes:
    out = bytearray(data)
    out[-8] ^= 0xFF  # the gzip trailer's CRC32
    return bytes(out)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not gzip at all", id="not-gzip"),
        pytest.param(gzip.compress(batch([make_event("gz-bad")]))[:-12], id="truncated"),
        pytest.param(_corrupt_crc(gzip.compress(batch([make_event("gz-bad")]))), id="bad-crc"),
    ],
)
def test_corrupt_gzip_is_400(server: EvdServer, body: bytes) -> None:
    r = post(server.port, body, headers={"Content-Encoding": "gzip"})
    assert r.status == 400
    assert "gzip" in r.json()["error"]
    assert "gz-bad" not in raw_events(server)


# -- pipelining, keep-alive, header limits ------------------------------------------------


def test_pipelined_requests_are_answered_in_order_on_one_connection(server: EvdServer) -> None:
    reqs = [
        raw_post(batch([make_event("pl-1")])),
        raw_get("/healthz"),
        raw_post(b"not json"),
        raw_post(batch([make_event("pl-2"), make_event("pl-3", user_id="other")])),
        raw_get("/nope"),
        raw_post(batch([{"event_id": "pl-bad"}, make_event("pl-4")])),
        raw_get("/readyz"),
    ]
    with RawConn(server.port) as conn:
        conn.send(b"".join(reqs))  # one send: the server sees them back to back
        resps = [conn.read_response() for _ in reqs]
        assert [r.status for r in resps] == [200, 200, 400, 200, 404, 200, 200]
        assert resps[0].json()["accepted"] == 1
        assert resps[3].json()["accepted"] == 2
        assert (resps[5].json()["accepted"], len(resps[5].json()["rejected"])) == (1, 1)
        # The same connection is reused for a later request, then closed on request.
        conn.send(raw_post(batch([make_event("pl-5")]), close=True))
        last = conn.read_response()
        assert (last.status, last.headers.get("connection")) == (200, "close")
        assert conn.wait_closed(5) == b""
    assert {"pl-1", "pl-2", "pl-3", "pl-4", "pl-5"} <= raw_events(server).keys()


def test_deep_pipeline_past_the_flow_control_mark_keeps_order(server: EvdServer) -> None:
    # 40 > HIGH_WATER_REQUESTS (32): reading pauses and resumes mid-pipeline.
    sizes = [i % 3 + 1 for i in range(40)]
    reqs = [
        raw_post(batch([make_event(f"deep-{i}-{j}", user_id=f"u{j}") for j in range(n)]))
        for i, n in enumerate(sizes)
    ]
    with RawConn(server.port) as conn:
        conn.send(b"".join(reqs))
        resps = [conn.read_response() for _ in reqs]
    assert [r.status for r in resps] == [200] * len(sizes)
    assert [r.json()["accepted"] for r in resps] == sizes


def test_head_responses_carry_no_content(server: EvdServer) -> None:
    # Pipelined: any content after a HEAD response would be read as the next response.
    with RawConn(server.port) as conn:
        conn.send(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + raw_get("/healthz")
                  + b"HEAD /nope HTTP/1.1\r\nHost: t\r\n\r\n" + raw_get("/readyz"))
        head = conn.read_response(after_head=True)
        get = conn.read_response()
        assert (head.status, get.status, get.json()) == (200, 200, {"status": "ok"})
        assert int(head.headers["content-length"]) == len(get.body)
        assert conn.read_response(after_head=True).status == 404
        assert conn.read_response().json()["ready"] is True


def test_keep_alive_connection_is_reused(server: EvdServer) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        socks = []
        for i in range(3):
            conn.request("POST", "/v1/events", batch([make_event(f"ka-{i}")]),
                         {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            socks.append(conn.sock)
        assert socks[0] is not None and socks[0] is socks[1] is socks[2]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("X-Big: " + "v" * (MAX_HEADER + 1) + "\r\n", id="one-big-header"),
        pytest.param("".join(f"X-H{i}: {'v' * 40}\r\n" for i in range(120)), id="many-headers"),
    ],
)
def test_oversized_headers_are_431(server: EvdServer, extra: str) -> None:
    with RawConn(server.port) as conn:
        conn.send(raw_post(batch([make_event("never-431")]), extra=extra))
        r = conn.read_response()
        assert r.status == 431
        assert conn.wait_closed(5) is not None


def test_oversized_request_line_is_431(server: EvdServer) -> None:
    with RawConn(server.port) as conn:
        conn.send(raw_get("/healthz?" + "q" * (MAX_HEADER + 1)))
        assert conn.read_response().status == 431


def test_unterminated_header_is_cut_off_at_the_limit(server: EvdServer) -> None:
    """A header line that never ends must not make the server buffer it until the timeout."""
    with RawConn(server.port) as conn:
        conn.send(b"POST /v1/events HTTP/1.1\r\nHost: test\r\nX-Endless: ")
        sent, answer = 0, None
        while sent < 4 << 20 and answer is None:  # 4 MiB, 1000x the limit
            try:
                conn.send(b"v" * 65536)
            except OSError:  # reset: the server gave up on us
                answer = conn.buf
                break
            sent += 65536
            answer = conn.wait_closed(0.001)
        if answer is None:
            answer = conn.wait_closed(2)
        assert answer is not None, "the server kept buffering an endless header"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
