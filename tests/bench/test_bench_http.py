"""The harness's keep-alive HTTP client against small asyncio servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from evd.bench.harness import main, wait_ready
from evd.bench.http import BenchHttpError, ConnectionPool, Target, build_request, fetch

Handler = Callable[[bytes, asyncio.StreamWriter], bool]


class FakeServer:
    """Answers each request head with whatever ``handler`` writes; counts connections."""

    def __init__(self, handler: Handler, delay: float = 0.0) -> None:
        self.handler = handler
        self.delay = delay
        self.connections = 0
        self.active = 0
        self.max_active = 0
        #: With ``gather`` set, a request is held until that many are active at once
        #: (``delay`` only bounds the wait): concurrency that does not depend on timing.
        self.gather = 0
        self.together = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for _ in range(100):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                if self.gather:
                    if self.active >= self.gather:
                        self.together.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.together.wait(), self.delay)
                else:
                    await asyncio.sleep(self.delay)
                self.active -= 1
                if not self.handler(head, writer):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed: the normal end of a keep-alive connection
        finally:
            writer.close()

    @property
    def target(self) -> Target:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return Target("127.0.0.1", port, "")


Starter = Callable[..., Awaitable[FakeServer]]


@pytest.fixture
async def fake() -> AsyncIterator[Starter]:
    """Start fake servers on free loopback ports; all are closed after the test."""
    made: list[FakeServer] = []

    async def start(handler: Handler, delay: float = 0.0) -> FakeServer:
        srv = FakeServer(handler, delay)
        srv.server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
        made.append(srv)
        return srv

    yield start
    for srv in made:
        assert srv.server is not None
        srv.server.close()
        await srv.server.wait_closed()


def _ok(head: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def _shed(head: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n")
    return True


def _close_after(head: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 503 Busy\r\nRetry-After: 1.5\r\nConnection: close\r\n"
                 b"Content-Length: 4\r\n\r\nbusy")
    return False


def _silent(head: bytes, writer: asyncio.StreamWriter) -> bool:
    return True


async def test_keep_alive_reuses_one_connection(fake: Starter) -> None:
    srv = await fake(_ok)
    pool = ConnectionPool(srv.target, limit=1, timeout=5)
    for _ in range(5):
        resp = await pool.request(build_request("POST", srv.target, "/v1/events", b"", b"{}"))
        assert resp.status == 200 and resp.body == b"ok" and resp.retry_after is None
    assert srv.connections == 1 and pool.connects == 1
    pool.close()


async def test_pool_bound_can_grow_and_shrink(fake: Starter) -> None:
    srv = await fake(_ok, delay=4.0)  # a bound: requests are released once `limit` are in
    pool = ConnectionPool(srv.target, limit=2, timeout=5)
    req = build_request("GET", srv.target, "/")

    async def burst(limit: int) -> int:
        srv.max_active, srv.gather, srv.together = 0, limit, asyncio.Event()
        await asyncio.gather(*(pool.request(req) for _ in range(6)))
        return srv.max_active

    assert await burst(2) == 2
    pool.set_limit(6)
    assert await burst(6) == 6
    pool.set_limit(2)
    assert await burst(2) == 2
    assert len(pool._idle) <= 2, "connections above a lowered bound are closed"
    pool.close()


async def test_retry_after_is_read_from_429(fake: Starter) -> None:
    srv = await fake(_shed)
    resp = await fetch(srv.target, "/v1/events")
    assert resp.status == 429 and resp.retry_after == 2.0


async def test_connection_close_makes_the_pool_reconnect(fake: Starter) -> None:
    srv = await fake(_close_after)
    pool = ConnectionPool(srv.target, limit=2, timeout=5)
    for _ in range(3):
        resp = await pool.request(build_request("GET", srv.target, "/"))
        assert resp.status == 503 and resp.retry_after == 1.5 and resp.body == b"busy"
    assert srv.connections == 3
    pool.close()


async def test_no_response_times_out(fake: Starter) -> None:
    srv = await fake(_silent)
    pool = ConnectionPool(srv.target, limit=1, timeout=0.3)
    with pytest.raises(BenchHttpError) as info:
        await pool.request(build_request("GET", srv.target, "/"))
    assert info.value.kind == "timeout"
    pool.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refused_connection_is_named() -> None:
    target = Target("127.0.0.1", _closed_port(), "")
    with pytest.raises(BenchHttpError) as info:
        await fetch(target, "/readyz", timeout=2)
    assert info.value.kind == "connect_refused"
    assert "connect_refused" in (await wait_ready(target, 0.2) or "")


def test_target_urls() -> None:
    assert Target.parse("http://127.0.0.1:8080") == Target("127.0.0.1", 8080, "")
    assert Target.parse("http://localhost/evd/") == Target("localhost", 80, "/evd")
    with pytest.raises(ValueError, match="http://"):
        Target.parse("https://127.0.0.1:8443")


def test_cli_refuses_a_dead_target_and_bad_options(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["--target", url, "--wait-ready", "0.2", "--out", str(tmp_path)]) == 2
    assert "is not ready" in capsys.readouterr().err
    assert main(["--target", url, "--spike-at", "2"]) == 2
    assert "numeric --rate" in capsys.readouterr().err
    assert main(["--target", url, "--rate", "100", "--duration", "5", "--spike-at", "3",
                 "--spike-duration", "5"]) == 2
    assert "before --duration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--rate", "fast"])
