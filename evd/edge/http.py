"""The HTTP/1.1 edge: a raw ``asyncio.Protocol`` over httptools.

A connection is built from the limits and its host (evd.edge.connection_host),
and uses nothing else of the server. ``data_received`` only feeds the parser;
the parser's callbacks collect the request and ``on_message_complete``
dispatches it: an authorized POST /v1/events to the host's ingest, anything
else to the host's routes (evd.edge.routes). Keep-alive and pipelining are
supported: responses are queued per connection in request order and written as
soon as the head of the queue is ready (a POST is ready once its group commit
is durable). Limits map to the contract's status codes; timeouts are enforced by
one sweep per server (``Server._sweep``) rather than a timer per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools

from evd.core.config import LimitsConfig
from evd.edge import metrics
from evd.edge.flow_control import FlowControl
from evd.edge.ingest import Pending, Reply, error_reply
from evd.edge.routes import EVENTS_PATH

if TYPE_CHECKING:
    from evd.edge.connection_host import ConnectionHost

__all__ = ["HttpProtocol", "Slot", "phase_timeouts", "render"]

log = logging.getLogger(__name__)


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())


STATUS_LINES = {
    s: _status_line(s)
    for s in (200, 400, 401, 404, 405, 408, 411, 413, 415, 429, 431, 500, 503)
}
JSON_HEADERS = b"Content-Type: application/json\r\nContent-Length: "
CLOSE = b"Connection: close\r\n"
INTERNAL_ERROR = error_reply(500, "internal error")
COMMIT_TIMED_OUT = error_reply(
    503, "timed out waiting for the log to make the events durable (limits.commit_timeout_s)", 5
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Connection phases, each with its own timeout. LINGER: an error was answered
#: before the request was read to its end; what the client still sends is read
#: and discarded (see HttpProtocol._linger).
IDLE, HEADERS, BODY, WAITING, LINGER = 0, 1, 2, 3, 4


def phase_timeouts(limits: LimitsConfig) -> tuple[float, float, float, float, float]:
    """How long a connection may stay in each phase, indexed by the phase.

    WAITING has no bound of its own: a POST's wait for its group commit is
    bounded per commit by ``limits.commit_timeout_s`` (the host's when_durable).
    """
    return (
        limits.keepalive_timeout_s,
        limits.header_timeout_s,
        limits.body_timeout_s,
        math.inf,
        limits.linger_timeout_s,
    )


def render(reply: Reply, close: bool, content_type: bytes | None = None) -> bytes:
    """The bytes of one HTTP response."""
    head = STATUS_LINES.get(reply.status) or _status_line(reply.status)
    extra = b""
    if reply.retry_after:
        extra += b"Retry-After: %d\r\n" % reply.retry_after
    if close:
        extra += CLOSE
    if content_type is None:
        return b"%s%s%d\r\n%s\r\n%s" % (head, JSON_HEADERS, len(reply.body), extra, reply.body)
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        head, content_type, len(reply.body), extra, reply.body,
    )


class Slot:
    """One pipelined request's place in the response queue."""

    __slots__ = ("close", "data", "started")

    def __init__(self, started: float) -> None:
        self.data: bytes | None = None
        self.close = False
        self.started = started


class HttpProtocol(asyncio.Protocol):
    """One client connection: every request it completes gets exactly one answer,
    written in request order, even when the host fails handling it (500)."""

    def __init__(self, limits: LimitsConfig, host: ConnectionHost) -> None:
        self.host = host
        self.limits = limits
        #: How long each phase may last, indexed by the phase.
        self.timeouts = phase_timeouts(limits)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.flow: FlowControl | None = None
        self.queue: deque[Slot] = deque()
        self.phase = IDLE
        self.deadline = 0.0
        self.closing = False
        #: The client closed its sending side.
        self.eof = False
        #: Bytes the client may still send once an error closes the connection
        #: (limits.linger_max_bytes); reading stops when they run out.
        self.linger_left = 0
        self.write_scheduled = False
        #: Requests begun on this connection (tells data_received whether a chunk
        #: belongs wholly to the head being read).
        self.messages = 0
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.path = b""
        self.header_bytes = 0
        #: Bytes of chunks that ended inside this request's head.
        self.head_received = 0
        self.content_length = -1
        self.content_type: bytes | None = None
        self.content_encoding: bytes | None = None
        self.authorization: bytes | None = None
        self.expect_continue = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.key: bytes | None = None
        self.discard = False
        #: The answer to a POST refused from its headers alone (its body is skipped).
        self.early: Reply | None = None

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.flow = FlowControl(self.transport)  # type: ignore[arg-type]
        self.host.connections.add(self)
        metrics.CONNECTIONS.inc()
        self._set_phase(IDLE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.host.connections.discard(self)
        metrics.CONNECTIONS.dec()
        self.queue.clear()

    def eof_received(self) -> bool | None:
        """The client will send no more: answer the requests it completed, then close."""
        self.eof = True
        if self.queue:
            self.queue[-1].close = True
            self.closing = True
            return True  # keep the transport open for the queued responses
        return None  # nothing to answer: the transport closes

    def pause_writing(self) -> None:
        assert self.flow is not None
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        assert self.flow is not None
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            # An error was answered (or is queued): what the client still sends
            # is discarded, within the linger bound.
            self.linger_left -= len(data)
            if self.linger_left < 0 and self.transport is not None:
                self.transport.close()
            return
        messages = self.messages
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # _Stop: a callback already queued the error response and began closing.
            if not self.closing:
                self.host.report(exc.__cause__ or exc, "an HTTP parser callback failed")
                self._fail(500, "internal error")
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
        if self.phase == HEADERS and self.messages == messages and not self.closing:
            # httptools holds an unfinished header line until it ends, so
            # on_header cannot bound it: bound every chunk that ends in the head.
            self.head_received += len(data)
            if self.head_received > self.limits.max_header_bytes:
                self._fail(431, "request line and headers exceed limits.max_header_bytes")

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self.messages += 1
        self._reset()
        self._set_phase(HEADERS)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.limits.max_header_bytes:
            self._fail(431, "request line and headers exceed limits.max_header_bytes")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header_bytes:
            self._fail(431, "request line and headers exceed limits.max_header_bytes")
            raise _Stop
        name = name.lower()
        if name == b"authorization":
            self.authorization = value
        elif name == b"content-type":
            self.content_type = value
        elif name == b"content-encoding":
            self.content_encoding = value
        elif name == b"content-length":
            self.content_length = int(value) if value.isdigit() else -1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True

    def on_headers_complete(self) -> None:
        self._set_phase(BODY)
        if self.host.draining:
            self.discard = True  # answered 503 once the body is in, connection closed
        self.path = path = self.url.split(b"?", 1)[0]
        if path != EVENTS_PATH:
            self.discard = True
            return
        method = self.parser.get_method()
        if method != b"POST":
            self.discard = True
            return
        authorize = self.host.authorize  # (see _set_phase)
        key = authorize(self.authorization)
        if key is None:
            self._fail(401, "missing or invalid API key (Authorization: Bearer <key>)")
            raise _Stop
        self.key = key
        ctype = (self.content_type or b"").split(b";", 1)[0].strip().lower()
        if ctype != b"application/json":
            self._fail(415, "Content-Type must be application/json")
            raise _Stop
        if self.content_length > self.limits.max_body_bytes:
            self._fail(413, f"body exceeds limits.max_body_bytes={self.limits.max_body_bytes}")
            raise _Stop
        shed = self.host.shed
        self.early = shed(key)
        if self.early is not None:
            self.discard = True  # keep the connection: skip the body, then answer
            return
        # 100 Continue is optional (RFC 9110 10.1.1): skip it while earlier
        # pipelined responses are queued, or it would overtake them.
        if self.expect_continue and not self.queue and self.transport is not None:
            self.transport.write(CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.discard:
            return
        self.body_size += len(body)
        if self.body_size > self.limits.max_body_bytes:
            self._fail(413, f"body exceeds limits.max_body_bytes={self.limits.max_body_bytes}")
            raise _Stop
        self.body.append(body)

    def on_message_complete(self) -> None:
        slot = Slot(time.perf_counter())
        self.queue.append(slot)
        assert self.flow is not None
        self.flow.request_started()
        keep_alive = self.parser.should_keep_alive() and not self.host.draining
        slot.close = not keep_alive
        self._set_phase(WAITING)
        try:
            self._dispatch(slot)
        except Exception as exc:  # noqa: BLE001 (every request gets one answer)
            self.host.report(exc, "handling a request failed")
            self._finish(slot, INTERNAL_ERROR, self.path)

    def _dispatch(self, slot: Slot) -> None:
        """Answer the complete request of ``slot`` now, or once its events are durable."""
        if self.early is not None:
            self._finish(slot, self.early, EVENTS_PATH)
            return
        if self.key is not None and not self.discard:
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            ingest_events = self.host.ingest_events
            result = ingest_events(body, self.content_encoding, self.key)
            if isinstance(result, Pending):
                self.host.when_durable(self, slot, result)
                return
            self._finish(slot, result, EVENTS_PATH)
            return
        path = self.path
        method = self.parser.get_method()
        reply, ctype = self.host.route(method, path, self.url)
        self._finish(slot, reply, path, ctype, head=method == b"HEAD")

    # -- responses -----------------------------------------------------------

    def committed(self, slot: Slot, pending: Pending, fut: asyncio.Future[Any]) -> None:
        """The group commit ``fut`` covering ``pending`` ended: answer 200, or 503."""
        if slot.data is not None:
            return  # answered 503 already: the commit outlasted limits.commit_timeout_s
        try:
            if fut.cancelled():
                reply = error_reply(503, "shutting down", 1)
            elif fut.exception() is not None:
                reply = error_reply(503, f"log unavailable: {fut.exception()}", 5)
            else:
                events_committed = self.host.events_committed
                events_committed(pending)
                reply = pending.reply
                metrics.REQUEST_SECONDS.observe(time.perf_counter() - slot.started)
        except Exception as exc:  # noqa: BLE001 (every request gets one answer)
            self.host.report(exc, "answering a committed request failed")
            reply = INTERNAL_ERROR
        self._finish(slot, reply, EVENTS_PATH)

    def commit_timed_out(self, slot: Slot) -> None:
        """The group commit of ``slot``'s request took over limits.commit_timeout_s."""
        self._finish(slot, COMMIT_TIMED_OUT, EVENTS_PATH)

    def _finish(
        self,
        slot: Slot,
        reply: Reply,
        path: bytes,
        content_type: bytes | None = None,
        head: bool = False,
    ) -> None:
        self.host.count_request(path, reply.status)
        data = render(reply, slot.close, content_type)
        # A HEAD response has the GET's headers and no content (RFC 9110 9.3.2);
        # content here would be read as the next response of the connection.
        slot.data = data[: len(data) - len(reply.body)] if head else data
        if not self.write_scheduled:
            self.write_scheduled = True
            self.host.write_soon(self)

    def write_ready(self) -> None:
        """Write the responses at the head of the queue that are ready, in order."""
        self.write_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        queue = self.queue
        flow = self.flow
        assert flow is not None
        out = []
        close = False
        while queue and queue[0].data is not None:
            slot = queue.popleft()
            out.append(slot.data)
            flow.request_done()
            if slot.close:
                close = True
                break
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[arg-type]
        if close:
            self.closing = True
            queue.clear()
            if self.linger_left > 0 and not self.eof and transport.can_write_eof():
                self._linger(transport)
            else:
                transport.close()
            return
        if not queue and self.phase == WAITING:
            self._set_phase(IDLE)

    def _fail(self, status: int, message: str) -> None:
        """Answer ``status`` after the responses already queued, then close.

        The request was not read to its end, so the close lingers (_linger).
        """
        if self.closing:
            return
        slot = Slot(time.perf_counter())
        slot.close = True
        self.queue.append(slot)
        assert self.flow is not None
        self.flow.request_started()
        self.closing = True  # stop parsing; write_ready still drains the queue
        self.linger_left = self.limits.linger_max_bytes
        self._finish(slot, error_reply(status, message), b"")
        # Write now rather than on the next loop turn: a timed-out or rejected
        # client gets its answer before the close, whatever runs in between.
        self.write_ready()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after an error answered before the request was read to its end.

        Closing a socket with unread input makes the kernel send a reset, which
        can reach a client that writes its whole request before reading ahead of
        the answer, and discard it. So, as nginx's lingering close: shut down the
        sending side (the client reads the answer, then end of stream), read and
        discard what the client still sends, and close once it closes too, after
        limits.linger_max_bytes, or after limits.linger_timeout_s.
        """
        transport.write_eof()
        self._set_phase(LINGER)
        assert self.flow is not None
        self.flow.release()

    # -- timeouts --------------------------------------------------------------

    def _set_phase(self, phase: int) -> None:
        self.phase = phase
        # The clock now, not the sweep's last reading (host.now): that one is a
        # sweep interval old or more, and the deadline would come that much early.
        # The host's callables may be bound methods of its parts held as
        # attributes: fetched as an attribute, then called, both steps are
        # specialized by the interpreter; called as a method, neither is.
        clock = self.host.clock
        self.deadline = clock() + self.timeouts[phase]

    def expire(self) -> None:
        """Called by the host's timeout sweep once ``deadline`` has passed."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.phase == IDLE or self.phase == LINGER:
            self.closing = True
            self.transport.close()
        elif self.phase in (HEADERS, BODY):
            what = "headers" if self.phase == HEADERS else "body"
            self._fail(408, f"timed out reading the request {what}")

    def shutdown(self) -> None:
        """Close at once if idle; otherwise close after the queued responses."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.phase == IDLE and not self.queue:
            self.closing = True
            self.transport.close()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing after an error response."""

