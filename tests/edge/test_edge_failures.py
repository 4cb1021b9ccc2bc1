"""The edge when something goes wrong: every request still gets exactly one answer.

An unexpected error is a 500 (its traceback logged, throttled) and the worker
serves on; a flush that fails for any reason, or a group commit that takes too
long, is a 503; an error answered before the request was read to its end
reaches a client that writes its whole request before reading (lingering
close); a request refused by the log leaves nothing of itself in the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from evdtest import (
    HOST,
    EvdServer,
    Response,
    ServerFactory,
    batch,
    exchange,
    make_event,
    parse_responses,
    raw_get,
    raw_post,
)

from evd.config import Config, load_config, with_overrides
from evd.core.errors import LogOverloaded, LogUnavailable
from evd.core.log import partition_for
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.streams import Stream
from evd.core.throttle import ThrottledLog
from evd.edge.http import HttpProtocol
from evd.edge.ingest import Ingest, Pending
from evd.edge.server import Server
from evd.logtool import iter_stream
from evd.worker import open_log


def config(tmp_path: Path, **limits: Any) -> Config:
    cfg = with_overrides(load_config(None, environ={}), data_dir=str(tmp_path))
    return msgspec.structs.replace(cfg, limits=msgspec.structs.replace(cfg.limits, **limits))


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[Server, EmbeddedLog]]:
    """A worker's edge in this process, on a real socket and a real log."""
    cfg = config(tmp_path, commit_timeout_s=0.5)
    lg = open_log(cfg)
    server = Server(cfg, lg, Ingest(cfg, lg))
    await server.start(HOST, 0)
    try:
        yield server, lg
    finally:
        await server.drain(0, 2)
        await lg.close()


def logged_ids(data_dir: Path | str) -> set[str]:
    return {e["event_id"] for e in iter_stream(data_dir, Stream.RAW)}


# -- 500: an unexpected error is contained -------------------------------------------------------


async def test_an_unexpected_error_is_500_and_the_worker_serves_on(
    edge: tuple[Server, EmbeddedLog], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = edge
    real_handle = server.ingest_events

    def handle(body: bytes, encoding: bytes | None, key: bytes) -> Any:
        if b"boom" in body:
            raise RuntimeError("a bug in ingest")
        return real_handle(body, encoding, key)

    monkeypatch.setattr(server, "ingest_events", handle)
    caplog.set_level(logging.ERROR, logger="evd.edge")
    for i in range(5):
        failed = await exchange(server.port, raw_post(batch([make_event(f"boom-{i}")]), close=True))
        assert (failed.status, failed.json()) == (500, {"error": "internal error"})
    ok = await exchange(server.port, raw_post(batch([make_event("fine")]), close=True))
    assert ok.status == 200 and ok.json()["accepted"] == 1
    assert (await exchange(server.port, raw_get("/healthz", close=True))).status == 200
    # One traceback for the five: a flood of failing requests cannot fill the disk.
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [str(r.exc_info[1]) for r in tracebacks] == ["a bug in ingest"]  # type: ignore[index]
    assert server.errors.suppressed == 4


async def test_a_failing_parser_callback_is_500(
    edge: tuple[Server, EmbeddedLog], monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, _ = edge

    def on_url(self: HttpProtocol, url: bytes) -> None:
        raise ValueError("a bug in a parser callback")

    monkeypatch.setattr(HttpProtocol, "on_url", on_url)
    failed = await exchange(server.port, raw_get("/healthz", close=True))
    assert failed.status == 500
    monkeypatch.undo()
    assert (await exchange(server.port, raw_get("/healthz", close=True))).status == 200


def test_throttled_log_logs_one_traceback_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("evd.test"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.ERROR, logger="evd.test")
    for t in (0.0, 1.0, 9.9, 10.0, 10.5, 25.0):
        now[0] = t
        throttled.error("failed", RuntimeError(f"at {t}"))
    assert [(r.getMessage(), str(r.exc_info[1])) for r in caplog.records] == [  # type: ignore[index]
        ("failed", "at 0.0"),
        ("failed (2 more errors since the last traceback were not logged)", "at 10.0"),
        ("failed (1 more errors since the last traceback were not logged)", "at 25.0"),
    ]


async def test_a_client_that_half_closes_still_gets_its_answers(
    edge: tuple[Server, EmbeddedLog],
) -> None:
    server, _ = edge
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        # Two requests, then the end of the client's stream before either is
        # answered (the POST waits for its group commit).
        writer.write(raw_post(batch([make_event("half-1")])) + raw_get("/healthz"))
        writer.write_eof()
        received = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert [r.status for r in parse_responses(received)] == [200, 200]


# -- 503: a flush that fails for any reason, a commit that takes too long -------------------------


async def test_a_flush_failing_with_any_exception_is_503_and_the_log_turns_read_only(
    edge: tuple[Server, EmbeddedLog],
) -> None:
    server, lg = edge

    def broken_fsync(fd: int) -> None:
        raise RuntimeError("not an OSError")

    lg.fsync_fn = broken_fsync
    failed = await exchange(server.port, raw_post(batch([make_event("x-1")]), close=True), 5)
    assert failed.status == 503 and int(failed.headers["retry-after"]) >= 1
    ready = await exchange(server.port, raw_get("/readyz", close=True))
    assert ready.json() == {"ready": False, "reason": "log is not writable"}
    later = await exchange(server.port, raw_post(batch([make_event("x-2")]), close=True), 5)
    assert later.status == 503
    assert "x-1" not in logged_ids(lg.root.parent)


async def test_a_commit_slower_than_commit_timeout_s_is_503(
    edge: tuple[Server, EmbeddedLog],
) -> None:
    server, lg = edge
    release = threading.Event()

    def stuck_fsync(fd: int) -> None:
        release.wait(10)

    lg.fsync_fn = stuck_fsync
    try:
        started = time.monotonic()
        slow = await exchange(server.port, raw_post(batch([make_event("s-1")]), close=True), 5)
        waited = time.monotonic() - started
        assert slow.status == 503 and int(slow.headers["retry-after"]) >= 1
        assert "commit_timeout_s" in slow.json()["error"]
        assert 0.5 <= waited < 3, waited  # commit_timeout_s=0.5, checked by the 0.25 s sweep
    finally:
        release.set()
    # The log did not fail; once the disk answers, requests succeed again.
    ok = await exchange(server.port, raw_post(batch([make_event("s-2")]), close=True), 5)
    assert ok.status == 200


# -- all of a request's appends, or none ------------------------------------------------------------


def two_partition_batch(prefix: str) -> tuple[bytes, set[str]]:
    """A body whose events go to two partitions of 8, plus one invalid (dead-lettered) event."""
    users = ["user-1", "user-2"]
    assert len({partition_for(u, 8) for u in users}) == 2
    events = [make_event(f"{prefix}-{i}", user_id=u) for i, u in enumerate(users)]
    bad = make_event(f"{prefix}-bad", track_id="not-a-track")
    return batch([*events, bad]), {e["event_id"] for e in events}


async def test_a_request_is_admitted_whole_or_refused_whole(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    lg = EmbeddedLog(tmp_path, 8, max_pending_bytes=1)
    lg.open()
    ingest = Ingest(cfg, lg)
    try:
        # Nothing pending: the request is admitted, though its first record alone
        # passes max_pending_bytes; all three of its records are queued.
        body, ids = two_partition_batch("whole")
        result = ingest.handle(body, None, b"k")
        assert isinstance(result, Pending)
        await result.durable
        assert ids <= logged_ids(tmp_path)
        assert len(list(iter_stream(tmp_path, Stream.DEAD_LETTER))) == 1

        # The log is over its bound now: the next request is refused, and none of
        # its records is queued behind the 503.
        lg.append("filler", 0, b"x" * 100)
        body, ids = two_partition_batch("refused")
        refused = ingest.handle(body, None, b"k")
        assert not isinstance(refused, Pending) and refused.status == 503
        await lg.flush()
        assert not ids & logged_ids(tmp_path)
        assert len(list(iter_stream(tmp_path, Stream.DEAD_LETTER))) == 1
    finally:
        await lg.close()


async def test_append_all_refuses_every_record_if_one_partition_cannot_open(
    tmp_path: Path,
) -> None:
    lg = EmbeddedLog(tmp_path, 4)
    lg.open()
    try:
        (tmp_path / "log" / Stream.RAW).mkdir(parents=True, exist_ok=True)
        (tmp_path / "log" / Stream.RAW / "0003").write_bytes(b"")  # a file where the directory goes
        with pytest.raises(LogUnavailable, match="cannot open raw/3"):
            lg.append_all([(Stream.RAW, 0, b"first"), (Stream.RAW, 3, b"second")])
        await lg.flush()
        assert lg.end_offset(Stream.RAW, 0) == 0  # the first record was not queued either
        lg.append(Stream.RAW, 1, b"x" * 64)
        lg.max_pending_bytes = 1
        with pytest.raises(LogOverloaded):
            lg.append_all([(Stream.RAW, 0, b"a"), (Stream.RAW, 1, b"b")])
    finally:
        await lg.close()


# -- lingering close ----------------------------------------------------------------------------

SMALL_BODY = 64 * 1024
BIG_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def lingering(module_servers: ServerFactory) -> EvdServer:
    return module_servers.start({"limits": {"max_body_bytes": SMALL_BODY, "linger_timeout_s": 1.0}})


def send_all_then_read(port: int, data: bytes, timeout: float = 20) -> tuple[list[Response], bool]:
    """Write the whole request, then read: (responses, whether the server then closed)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return parse_responses(received), True
            received += chunk


def big_post(authorization: str = "Bearer evd-dev-key", size: int = BIG_BODY) -> bytes:
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: {authorization}\r\nContent-Length: {size}\r\n\r\n"
    )
    return head.encode() + b" " * size


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(big_post(), 413, id="413-content-length"),
        pytest.param(big_post("Bearer wrong"), 401, id="401"),
        pytest.param(
            b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer evd-dev-key\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(128)) + b"0\r\n\r\n",
            413, id="413-chunked",
        ),
    ],
)
def test_an_early_error_reaches_a_client_that_writes_everything_first(
    lingering: EvdServer, request_bytes: bytes, status: int
) -> None:
    responses, closed = send_all_then_read(lingering.port, request_bytes)
    assert [r.status for r in responses] == [status]
    assert closed


def test_lingering_ends_after_linger_timeout_s(lingering: EvdServer) -> None:
    with socket.create_connection((HOST, lingering.port), timeout=10) as sock:
        # Before the server can have seen the head, so before it started lingering.
        started = time.monotonic()
        sock.sendall(big_post()[: 256 * 1024])  # the head and part of the body, then silence
        received = b""
        while chunk := sock.recv(65536):  # the answer, then the end of the server's sending
            received += chunk
        assert [r.status for r in parse_responses(received)] == [413]
        # The server still reads (and discards) until linger_timeout_s; once it has
        # closed, a byte sent is answered with a reset, and the next send fails.
        with pytest.raises(OSError):
            while time.monotonic() - started < 30:
                sock.send(b" ")
                time.sleep(0.05)
        waited = time.monotonic() - started
    # linger_timeout_s=1.0, checked by the 0.25 s sweep: not before it, and well before
    # the 5 s default (its upper bound allows a busy machine 3 s more).
    assert 0.9 < waited < 4.5, waited


def test_lingering_ends_after_linger_max_bytes(servers: ServerFactory) -> None:
    server = servers.start({"limits": {"max_body_bytes": SMALL_BODY, "linger_max_bytes": 65536}})
    # The server stops reading after 64 KiB more and closes; with that much unread,
    # the kernel resets the connection, so the client cannot send it all.
    with pytest.raises(OSError):
        send_all_then_read(server.port, big_post(size=64 * 1024 * 1024))
