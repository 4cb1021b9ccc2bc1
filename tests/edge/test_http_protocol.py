"""HttpProtocol with a fake transport: bytes delivered in any fragmentation give
the same responses, in order; bounds hold however the head is split. At the end,
connections built from the limits and a fake host: what the host is asked, and a
host failure contained as a 500."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from evdtest import MemoryLog, Response, batch, make_event, parse_responses, raw_get, raw_post

from evd.config import load_config
from evd.core.log import Append
from evd.edge.http import HttpProtocol, Slot, render
from evd.edge.ingest import Ingest, Pending, Reply
from evd.edge.routes import Answer, Routes
from evd.edge.server import Server

MAX_HEADER = 2048


class FakeTransport(asyncio.Transport):
    """Collects what the protocol writes; records closes, write_eof and read pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.eof_written = False
        self.paused = False

    @property
    def ended(self) -> bool:
        """The server closed the connection or its sending side (a lingering close)."""
        return self.closed or self.eof_written

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed and not self.eof_written, "write after close"
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def connect(**limits: Any) -> tuple[HttpProtocol, FakeTransport, MemoryLog]:
    cfg = load_config(None, environ={})
    cfg = msgspec.structs.replace(
        cfg, limits=msgspec.structs.replace(cfg.limits, max_header_bytes=MAX_HEADER, **limits)
    )
    log = MemoryLog()
    server = Server(cfg, log, Ingest(cfg, log))
    proto = HttpProtocol(cfg.limits, server)
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport, log


async def feed(proto: HttpProtocol, data: bytes, sizes: list[int]) -> None:
    """Deliver ``data`` in pieces of the given sizes (cycled), letting the loop run."""
    pos, i = 0, 0
    while pos < len(data) and not proto.closing:
        n = sizes[i % len(sizes)]
        proto.data_received(data[pos : pos + n])
        pos += n
        i += 1
        await asyncio.sleep(0)
    for _ in range(10):  # responses are written on a later loop turn
        await asyncio.sleep(0)


async def close(proto: HttpProtocol) -> None:
    proto.connection_lost(None)


PIPELINE = [
    raw_post(batch([make_event("fp-1")])),
    raw_get("/healthz"),
    raw_post(b"not json"),
    raw_post(batch([make_event("fp-2"), make_event("fp-3", user_id="other")])),
    raw_get("/nope"),
    raw_post(
        batch([make_event("fp-4")]),
        extra="X-Padding: " + "p" * (MAX_HEADER - 300) + "\r\n",  # near the header limit
    ),
]
EXPECTED = [200, 200, 400, 200, 404, 200]


@pytest.mark.parametrize(
    "sizes",
    [[1 << 20], [1], [2, 3, 5], [7, 1, 64], [100], [4096, 1]],
    ids=["whole", "bytewise", "tiny", "mixed", "100", "4096-1"],
)
async def test_any_fragmentation_gives_the_same_responses_in_order(sizes: list[int]) -> None:
    proto, transport, log = await connect()
    try:
        await feed(proto, b"".join(PIPELINE), sizes)
        resps: list[Response] = parse_responses(bytes(transport.written))
        assert [r.status for r in resps] == EXPECTED
        assert [r.json()["accepted"] for r in resps if r.status == 200 and b"accepted" in r.body] == [
            1, 2, 1,
        ]
        assert sorted(log.raw_ids()) == ["fp-1", "fp-2", "fp-3", "fp-4"]
        assert not transport.ended
    finally:
        await close(proto)


@pytest.mark.parametrize("sizes", [[1 << 20], [1], [300], [MAX_HEADER + 10]])
async def test_unfinished_head_is_431_however_it_arrives(sizes: list[int]) -> None:
    # The bound is the read in which the request began (where it starts inside that
    # read is unknown) plus max_header_bytes: no more of an unfinished head is held.
    proto, transport, _ = await connect()
    try:
        head = b"POST /v1/events HTTP/1.1\r\nHost: t\r\nX-Endless: " + b"v" * (4 * MAX_HEADER)
        await feed(proto, head, sizes)
        await feed(proto, b"v" * (MAX_HEADER + 1), sizes)
        resps = parse_responses(bytes(transport.written))
        assert [r.status for r in resps] == [431]
        assert transport.ended
    finally:
        await close(proto)


async def test_flow_control_pauses_reading_under_a_deep_pipeline() -> None:
    proto, transport, _ = await connect()
    # A POST's response waits for its group commit's callbacks, which run on a later
    # loop turn: 40 POSTs in one read pass the high-water mark (32) before any is done.
    reqs = [raw_post(batch([make_event(f"deep-{i}")])) for i in range(40)]
    try:
        proto.data_received(b"".join(reqs))
        assert transport.paused
        for _ in range(20):
            await asyncio.sleep(0)
        assert not transport.paused
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200] * 40
    finally:
        await close(proto)


async def test_error_after_pipelined_requests_keeps_their_responses_first() -> None:
    proto, transport, _ = await connect()
    try:
        data = raw_post(batch([make_event("first")])) + b"GARBAGE / NOT-HTTP\r\n\r\n"
        await feed(proto, data, [1 << 20])
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200, 400]
        assert transport.ended
    finally:
        await close(proto)


async def test_100_continue_never_overtakes_a_queued_response() -> None:
    proto, transport, _ = await connect()
    try:
        expect = raw_post(batch([make_event("c-2")]), extra="Expect: 100-continue\r\n")
        head, body = expect.split(b"\r\n\r\n", 1)
        # First request still waits for its group commit when the second one's head
        # arrives: no 100 Continue may be written before the first response.
        proto.data_received(raw_post(batch([make_event("c-1")])) + head + b"\r\n\r\n")
        assert b"100 Continue" not in transport.written
        await feed(proto, body, [1 << 20])
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200, 200]
        # Alone on the connection, the client is told to go on.
        proto.data_received(head + b"\r\n\r\n")
        assert transport.written.endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    finally:
        await close(proto)


async def test_a_key_over_its_rate_is_refused_from_headers_alone() -> None:
    # A slow refill (one event in 100 s): the bucket stays empty however slow the machine.
    proto, transport, log = await connect(rate_limit_events_per_s=0.01, rate_limit_burst=2)
    try:
        first = raw_post(batch([make_event("r-1"), make_event("r-2")]))
        # The bucket is empty now: the next body is not even decoded (it is not
        # JSON, which would be a 400), and the connection stays usable.
        await feed(proto, first + raw_post(b"not json at all") + raw_get("/healthz"), [1 << 20])
        resps = parse_responses(bytes(transport.written))
        assert [r.status for r in resps] == [200, 429, 200]
        assert int(resps[1].headers["retry-after"]) >= 1
        assert log.raw_ids() == ["r-1", "r-2"]
        assert not transport.ended
    finally:
        await close(proto)


async def test_an_overloaded_log_sheds_posts_before_their_bodies() -> None:
    proto, transport, log = await connect()
    try:
        log.is_overloaded = True
        await feed(proto, raw_post(b"not json") + raw_get("/healthz"), [1 << 20])
        resps = parse_responses(bytes(transport.written))
        assert [r.status for r in resps] == [503, 200]
        assert resps[0].headers["retry-after"] == "1"
        log.is_overloaded = False
        await feed(proto, raw_post(batch([make_event("o-1")])), [1 << 20])
        assert parse_responses(bytes(transport.written))[-1].status == 200
        assert log.raw_ids() == ["o-1"]
    finally:
        await close(proto)


async def test_requests_pipelined_after_connection_close_are_not_processed() -> None:
    # llhttp refuses data after a message that closes the connection.
    proto, transport, log = await connect()
    try:
        data = raw_post(batch([make_event("c-a")]), close=True) + raw_post(batch([make_event("c-b")]))
        await feed(proto, data, [1 << 20])
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200]
        assert transport.ended
        assert log.raw_ids() == ["c-a"]  # nothing appended that could not be answered
    finally:
        await close(proto)


class HeldLog(MemoryLog):
    """A log whose appends all wait on one group commit until the test ends it."""

    def __init__(self) -> None:
        super().__init__()
        self.commit: asyncio.Future[None] | None = None

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        self.appends.extend(records)
        if self.commit is None:
            self.commit = asyncio.get_running_loop().create_future()
        return self.commit


@pytest.mark.parametrize("outcome", ["durable", "failed"])
async def test_one_group_commit_answers_every_connection_waiting_on_it(outcome: str) -> None:
    server, _, log = held_server()
    conns = []
    for _ in range(3):
        proto, transport = HttpProtocol(server.cfg.limits, server), FakeTransport()
        proto.connection_made(transport)
        conns.append((proto, transport))
    try:
        for i, (proto, _) in enumerate(conns):
            # Two pipelined POSTs per connection, all covered by the same commit.
            data = raw_post(batch([make_event(f"g-{i}-a")])) + raw_post(
                batch([make_event(f"g-{i}-b")])
            )
            await feed(proto, data, [1 << 20])
        assert all(not transport.written for _, transport in conns)  # not durable yet
        assert log.commit is not None
        if outcome == "durable":
            log.commit.set_result(None)
        else:
            log.commit.set_exception(OSError("disk gone"))
        for _ in range(5):
            await asyncio.sleep(0)
        want = [200, 200] if outcome == "durable" else [503, 503]
        for _, transport in conns:
            assert [r.status for r in parse_responses(bytes(transport.written))] == want
    finally:
        for proto, _ in conns:
            await close(proto)


class BrokenTransport(FakeTransport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("transport broke")


@pytest.fixture
def reported(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The exceptions the edge logged with their tracebacks so far in the test."""
    caplog.set_level(logging.ERROR, logger="evd.edge")

    def exceptions() -> list[str]:
        return [str(r.exc_info[1]) for r in caplog.records
                if r.name.startswith("evd.edge") and r.exc_info]

    return exceptions


async def post_each_and_commit(
    server: Server, log: HeldLog, transports: list[FakeTransport], prefix: str
) -> None:
    """One POST per transport, all covered by the log's one commit, which then succeeds."""
    protos = []
    try:
        for i, transport in enumerate(transports):
            proto = HttpProtocol(server.cfg.limits, server)
            proto.connection_made(transport)
            protos.append(proto)
            await feed(proto, raw_post(batch([make_event(f"{prefix}-{i}")])), [1 << 20])
        assert log.commit is not None
        log.commit.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
    finally:
        for proto in protos:
            await close(proto)


def held_server() -> tuple[Server, Ingest, HeldLog]:
    cfg = load_config(None, environ={})
    log = HeldLog()
    ingest = Ingest(cfg, log)
    server = Server(cfg, log, ingest)
    return server, ingest, log


async def test_a_connection_failing_to_write_does_not_strand_the_others(
    reported: Callable[[], list[str]],
) -> None:
    server, _, log = held_server()
    transports = [FakeTransport(), BrokenTransport(), FakeTransport()]
    await post_each_and_commit(server, log, transports, "b")
    assert [r.status for r in parse_responses(bytes(transports[0].written))] == [200]
    assert [r.status for r in parse_responses(bytes(transports[2].written))] == [200]
    assert reported() == ["transport broke"]
    assert transports[1].closed  # its responses are lost: the client must see that


async def test_a_request_failing_to_commit_does_not_strand_the_others(
    monkeypatch: pytest.MonkeyPatch, reported: Callable[[], list[str]]
) -> None:
    server, ingest, log = held_server()
    real_committed = ingest.committed

    def committed(pending: Pending) -> None:
        if pending.event_ids == ["f-0"]:
            raise RuntimeError("bookkeeping broke")
        real_committed(pending)

    monkeypatch.setattr(server, "events_committed", committed)
    transports = [FakeTransport() for _ in range(3)]
    await post_each_and_commit(server, log, transports, "f")
    # Every request gets one answer: a 500 for the one whose bookkeeping failed.
    assert [[r.status for r in parse_responses(bytes(t.written))] for t in transports] == [
        [500], [200], [200],
    ]
    assert reported() == ["bookkeeping broke"]


# -- a connection built from the limits and a fake host (no Server, no log) ------

CANNED = Reply(200, b'{"accepted":1}')


class FakeHost:
    """A ConnectionHost that records what its connection asks of it.

    ``ingest_events`` answers ``answer`` (raises it, if it is an exception), or,
    with ``durable`` set, a Pending on that future.
    """

    def __init__(self, answer: Reply | Exception = CANNED) -> None:
        self.connections: set[HttpProtocol] = set()
        self.now = 0.0
        self.clock = lambda: self.now
        self.draining = False
        self.answer = answer
        self.durable: asyncio.Future[None] | None = None
        self.ingested: list[tuple[bytes, bytes | None, bytes]] = []
        self.committed: list[Pending] = []
        self.routed: list[tuple[bytes, bytes, bytes]] = []
        self.counted: list[tuple[bytes, int]] = []
        self.reported: list[tuple[BaseException, str]] = []

    def authorize(self, authorization: bytes | None) -> bytes | None:
        return b"k1" if authorization == b"Bearer secret" else None

    def shed(self, key: bytes) -> Reply | None:
        return None

    def ingest_events(self, body: bytes, encoding: bytes | None, key: bytes) -> Reply | Pending:
        self.ingested.append((body, encoding, key))
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.durable is not None:
            return Pending(self.durable, self.answer, ["e-1"])
        return self.answer

    def events_committed(self, pending: Pending) -> None:
        self.committed.append(pending)

    def when_durable(self, conn: HttpProtocol, slot: Slot, pending: Pending) -> None:
        pending.durable.add_done_callback(lambda fut: conn.committed(slot, pending, fut))

    def route(self, method: bytes, path: bytes, url: bytes) -> Answer:
        self.routed.append((method, path, url))
        return Routes({}).route(method, path, url)

    def count_request(self, path: bytes, status: int) -> None:
        self.counted.append((path, status))

    def write_soon(self, conn: HttpProtocol) -> None:
        asyncio.get_running_loop().call_soon(conn.write_ready)

    def report(self, exc: BaseException, message: str) -> None:
        self.reported.append((exc, message))


def hosted(host: FakeHost) -> tuple[HttpProtocol, FakeTransport]:
    cfg = load_config(None, environ={})
    proto = HttpProtocol(cfg.limits, host)
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


@pytest.mark.parametrize("sizes", [[1 << 20], [1], [7, 1, 64]], ids=["whole", "bytewise", "mixed"])
async def test_a_post_reaches_the_hosts_ingest_and_gets_its_reply(sizes: list[int]) -> None:
    host = FakeHost()
    proto, transport = hosted(host)
    assert host.connections == {proto}
    try:
        await feed(proto, raw_post(b'{"events":[]}', key="secret") + raw_get("/nope?x=1"), sizes)
        assert host.ingested == [(b'{"events":[]}', None, b"k1")]
        assert host.routed == [(b"GET", b"/nope", b"/nope?x=1")]
        # The canned reply, byte for byte, then the routes' 404.
        assert bytes(transport.written).startswith(render(CANNED, close=False))
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200, 404]
        assert host.counted == [(b"/v1/events", 200), (b"/nope", 404)]
        assert host.reported == [] and not transport.ended
    finally:
        await close(proto)
    assert host.connections == set()


async def test_a_post_is_answered_once_the_host_makes_it_durable() -> None:
    host = FakeHost()
    host.durable = asyncio.get_running_loop().create_future()
    proto, transport = hosted(host)
    try:
        await feed(proto, raw_post(b"[]", key="secret"), [1 << 20])
        assert not transport.written and host.committed == []
        host.durable.set_result(None)
        await feed(proto, b"", [1])
        assert [r.status for r in parse_responses(bytes(transport.written))] == [200]
        assert [p.event_ids for p in host.committed] == [["e-1"]]
    finally:
        await close(proto)


async def test_a_post_without_a_valid_key_never_reaches_the_ingest() -> None:
    host = FakeHost()
    proto, transport = hosted(host)
    try:
        await feed(proto, raw_post(b"[]", key="wrong"), [1 << 20])
        assert [r.status for r in parse_responses(bytes(transport.written))] == [401]
        assert host.ingested == [] and transport.ended
    finally:
        await close(proto)


async def test_a_host_error_is_contained_and_answered_500() -> None:
    boom = RuntimeError("the host broke")
    host = FakeHost(boom)
    proto, transport = hosted(host)
    try:
        await feed(proto, raw_post(b"[]", key="secret") + raw_get("/nope"), [1 << 20])
        resps = parse_responses(bytes(transport.written))
        assert [(r.status, r.json()) for r in resps] == [
            (500, {"error": "internal error"}), (404, {"error": "not found"}),
        ]
        assert host.reported == [(boom, "handling a request failed")]
        assert not transport.ended  # the connection serves on
    finally:
        await close(proto)
