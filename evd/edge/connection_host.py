"""``ConnectionHost``: what one HTTP connection uses of the server that accepted it.

An ``HttpProtocol`` is built from the limits and a host, and reaches nothing
else: not the key ring, the ingest, the log or the metrics registry behind it.
``evd.edge.server.Server`` is the host of every connection of a worker; a test
can hand a connection a small fake instead. Every member is used on the
connection's event loop only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from evd.edge.http import HttpProtocol, Slot
    from evd.edge.ingest import Pending, Reply
    from evd.edge.routes import Answer

__all__ = ["ConnectionHost"]


class ConnectionHost(Protocol):
    """The services of a server to its connections, each request's in a few calls."""

    #: The open connections: a connection adds itself when made and removes
    #: itself when lost (the timeout sweep and draining walk this set).
    connections: set[HttpProtocol]
    #: Loop time as of the latest timeout sweep (what the sweep compares deadlines with).
    now: float
    #: The loop's clock: a phase deadline counts from it, not from ``now``, which
    #: is up to a sweep interval old and would make the deadline that much early.
    clock: Callable[[], float]
    #: The server is draining: every request is answered 503, and a response
    #: closes its connection.
    draining: bool

    def authorize(self, authorization: bytes | None) -> bytes | None:
        """The API key an ``Authorization`` header value carries, or None if none is valid."""
        ...

    def shed(self, key: bytes) -> Reply | None:
        """The answer to a POST refused from its headers alone (429, 503), or None."""
        ...

    def ingest_events(self, body: bytes, encoding: bytes | None, key: bytes) -> Reply | Pending:
        """Answer the body of an authorized POST /v1/events, now or once its events are durable."""
        ...

    def events_committed(self, pending: Pending) -> None:
        """The events of ``pending`` are durable: account for them before the 200 goes out."""
        ...

    def when_durable(self, conn: HttpProtocol, slot: Slot, pending: Pending) -> None:
        """Call ``conn.committed(slot, pending, future)`` once ``pending.durable`` is done,
        or ``conn.commit_timed_out(slot)`` if that takes over limits.commit_timeout_s."""
        ...

    def route(self, method: bytes, path: bytes, url: bytes) -> Answer:
        """The answer to any request but an authorized POST /v1/events (evd.edge.routes)."""
        ...

    def count_request(self, path: bytes, status: int) -> None:
        """Count one answered request."""
        ...

    def write_soon(self, conn: HttpProtocol) -> None:
        """Call ``conn.write_ready()`` once this loop pass's callbacks have run."""
        ...

    def report(self, exc: BaseException, message: str) -> None:
        """A failure serving one connection, which the connection answers and contains."""
        ...
