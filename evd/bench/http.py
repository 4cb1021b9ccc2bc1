"""Minimal keep-alive HTTP/1.1 client on asyncio transports, parsed by httptools.

One ``Connection`` carries one request at a time (no pipelining), which is how a
real client's connection behaves and what lets latency be measured per request.
``ConnectionPool`` hands out idle connections and opens new ones up to a bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from evd.core.errors import EvdError


class BenchHttpError(EvdError):
    """A request that got no HTTP response; ``kind`` names why, for the report."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Response(NamedTuple):
    """Status, the ``Retry-After`` header if any (seconds), and the body."""

    status: int
    retry_after: float | None
    body: bytes


class Target(NamedTuple):
    """Where requests go: ``http://host:port`` plus a path prefix."""

    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """Parse ``http://host[:port][/prefix]``; https is refused (the harness is plain HTTP)."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"--target must be an http:// URL, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"--target has no host: {url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"))

    def host_header(self) -> str:
        """Value of the ``Host`` header."""
        return f"{self.host}:{self.port}"


def _parse_retry_after(value: bytes) -> float | None:
    try:
        return float(value.decode("latin-1").strip())
    except ValueError:
        # An HTTP-date Retry-After: treat it as present but of unknown length.
        return -1.0


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends bytes and waits for the response."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self._body: list[bytes] = []
        self._retry_after: float | None = None
        self._lost: BaseException | None = None
        self.closed = False

    # asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BenchHttpError("bad_response", str(exc)))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(BenchHttpError("connection_lost", str(exc) if exc else "closed by peer"))

    # httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        self._body = []
        self._retry_after = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = _parse_retry_after(value)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        keep = self._parser.should_keep_alive()
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(status, self._retry_after, b"".join(self._body)))
        if not keep:
            self.close()

    # client side ------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        """Close the socket; a request in flight fails with ``connection_lost``."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def request(self, data: bytes, timeout: float) -> Response:
        """Send one complete request and return its response, or raise ``BenchHttpError``."""
        if self.closed or self._transport is None:
            raise BenchHttpError("connection_lost", "connection already closed")
        if self._waiter is not None:
            raise RuntimeError("Connection.request called while a request is in flight")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self._transport.write(data)
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            # The late response could not be told apart from the next one's.
            self._waiter = None
            self.close()
            raise BenchHttpError("timeout", f"no response within {timeout:g}s") from None
        except BaseException:
            # Cancelled or failed mid-request: same reason, the socket is unusable.
            self._waiter = None
            self.close()
            raise


async def open_connection(target: Target, timeout: float) -> Connection:
    """Connect to ``target`` with TCP_NODELAY, or raise ``BenchHttpError``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(Connection, target.host, target.port)
    except TimeoutError:
        raise BenchHttpError("connect_timeout", f"{target.host_header()}") from None
    except ConnectionRefusedError:
        raise BenchHttpError("connect_refused", f"{target.host_header()}") from None
    except OSError as exc:
        raise BenchHttpError("connect_error", str(exc)) from None
    return proto


class ConnectionPool:
    """Idle keep-alive connections to one target, at most ``limit`` in use at once.

    ``limit`` bounds the requests this process has in flight; an open-loop driver
    that finds every connection busy waits in ``acquire``, and that wait is part of
    the measured latency because latency counts from the scheduled send time.
    ``set_limit`` changes the bound at run time (a spike brings more clients);
    connections above a lowered bound are closed as they come back.
    """

    def __init__(self, target: Target, limit: int, timeout: float) -> None:
        self.target = target
        self.limit = max(1, limit)
        self.timeout = timeout
        self._idle: list[Connection] = []
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.connects = 0

    def set_limit(self, limit: int) -> None:
        """Allow ``limit`` connections in use from now on."""
        self.limit = max(1, limit)
        self._trim()
        self._wake()

    def _trim(self) -> None:
        # Idle plus in-use connections never exceed the bound for long.
        while self._idle and len(self._idle) + self._used > self.limit:
            self._idle.pop().close()

    def _wake(self) -> None:
        while self._waiters and self._used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._used += 1
                waiter.set_result(None)

    async def _slot(self) -> None:
        if self._used < self.limit and not self._waiters:
            self._used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted a slot in the same loop turn as the cancel: hand it on.
                self._used -= 1
                self._wake()
            raise

    async def acquire(self) -> Connection:
        """Wait for a free slot and return an open connection (reused or new)."""
        await self._slot()
        try:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn
            conn = await open_connection(self.target, self.timeout)
        except BaseException:
            self._used -= 1
            self._wake()
            raise
        self.connects += 1
        return conn

    def release(self, conn: Connection) -> None:
        """Give back a connection from ``acquire``; closed or surplus ones are dropped."""
        if not conn.closed:
            self._idle.append(conn)
        self._used -= 1
        self._trim()
        self._wake()

    async def request(self, data: bytes) -> Response:
        """Send ``data`` on a pooled connection and return the response."""
        conn = await self.acquire()
        try:
            return await conn.request(data, self.timeout)
        finally:
            self.release(conn)

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def build_request(method: str, target: Target, path: str, extra_headers: bytes = b"",
                  body: bytes | None = None) -> bytes:
    """Return the bytes of one HTTP/1.1 request (keep-alive)."""
    head = (f"{method} {target.prefix}{path} HTTP/1.1\r\nHost: {target.host_header()}\r\n"
            f"User-Agent: evd-bench\r\n").encode("latin-1") + extra_headers
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def fetch(target: Target, path: str, timeout: float = 5.0) -> Response:
    """GET ``path`` on a fresh connection (for /readyz and /metrics, off the hot path)."""
    conn = await open_connection(target, timeout)
    try:
        return await conn.request(build_request("GET", target, path), timeout)
    finally:
        conn.close()
