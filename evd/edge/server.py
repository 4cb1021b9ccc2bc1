"""The HTTP server of one worker: the host of its connections.

``Server`` owns the listening socket and the open connections, and is the
``ConnectionHost`` (evd.edge.connection_host) of each of them: the key ring, the
ingest, the routes (evd.edge.routes) with the handlers of ``/readyz``,
``/metrics`` and the top-tracks charts, the clock of the timeout sweep,
releasing the requests of a group commit at once, batching response writes,
and draining.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST

from evd.config import Config
from evd.core.host import HostState
from evd.core.log import Producer
from evd.core.metrics.exposition import render
from evd.core.metrics.lifecycle import set_ready
from evd.core.throttle import ThrottledLog
from evd.edge import metrics
from evd.edge.auth import KeyRing
from evd.edge.charts import ChartsView, QueryError, parse_query
from evd.edge.http import HttpProtocol, Slot
from evd.edge.ingest import Ingest, Pending, Reply, error_reply
from evd.edge.routes import (
    CHARTS_PATH,
    HEALTHZ_PATH,
    METRICS_PATH,
    PATH_LABELS,
    READYZ_PATH,
    Answer,
    Routes,
    healthz,
)

__all__ = ["Readiness", "Server"]

Waiter = tuple[HttpProtocol, Slot, Pending]

log = logging.getLogger(__name__)

#: How often idle, slow-header and slow-body deadlines are checked (seconds).
SWEEP_INTERVAL_S = 0.25
#: Pending connections the kernel queues before accept.
BACKLOG = 2048

_METRICS_TYPE = CONTENT_TYPE_LATEST.encode()


class Readiness(msgspec.Struct):
    ready: bool
    reason: str | None = None


class Server:
    """Owns the listening socket and every connection of one worker; their host."""

    def __init__(
        self, cfg: Config, log_: Producer, ingest: Ingest, host: HostState | None = None
    ) -> None:
        self.cfg = cfg
        self.log = log_
        self.ingest = ingest
        #: The top-tracks charts (evd.edge.charts), when this process follows them.
        self.charts: ChartsView | None = None
        #: The server's workers: /readyz waits for all of them.
        self.host = host or HostState.alone()
        self.keys = KeyRing(cfg.auth)
        # The ConnectionHost services a request calls, bound once so that a
        # connection calls the key ring, the ingest and the routes directly.
        self.authorize = self.keys.check
        self.shed = ingest.shed
        self.ingest_events = ingest.handle
        self.events_committed = ingest.committed
        self.route = Routes({
            HEALTHZ_PATH: healthz,
            READYZ_PATH: self._readyz,
            METRICS_PATH: self._metrics,
            CHARTS_PATH: self._charts,
        }).route
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        #: Failures serving a request, logged with their tracebacks, a few at most.
        self.errors = ThrottledLog(log)
        #: Created inside the worker's running loop.
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self.clock = self.loop.time
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: Requests waiting for a group commit, by the commit's future, with when
        #: the first of them began waiting: one done-callback per commit releases
        #: them all, in arrival order; the sweep answers 503 to those waiting past
        #: limits.commit_timeout_s.
        self._waiting: dict[asyncio.Future[Any], tuple[float, list[Waiter]]] = {}
        self.commit_timeout_s = cfg.limits.commit_timeout_s
        #: Connections with responses to write once this loop pass's callbacks ran.
        self._to_write: list[HttpProtocol] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def unready_reason(self) -> str | None:
        """Why /readyz fails, or None when ready."""
        if self.draining:
            return "draining"
        if not self.log.writable:
            return "log is not writable"
        host = self.host
        if not host.all_up():
            up = sum(host.up(k) for k in range(host.workers))
            return f"waiting for workers: {up} of {host.workers} up"
        return None

    def _readyz(self, url: bytes) -> Answer:
        """GET /readyz: 200 when ready, else 503 with the reason."""
        reason = self.unready_reason()
        set_ready(reason is None)
        body = msgspec.json.encode(Readiness(reason is None, reason))
        return Reply(200 if reason is None else 503, body), None

    def _metrics(self, url: bytes) -> Answer:
        """GET /metrics: the whole server's metrics (every worker's, merged), this
        worker's readiness as of now."""
        set_ready(self.unready_reason() is None)
        return Reply(200, render()), _METRICS_TYPE

    def _charts(self, url: bytes) -> Answer:
        """GET /v1/charts/top-tracks: the query's top tracks (400 for a bad query)."""
        view = self.charts
        if view is None:
            return error_reply(404, "charts are not served by this process"), None
        query = url.partition(b"?")[2].decode("latin-1")
        try:
            parsed = parse_query(query, view.window_ms, view.retention_ms)
        except QueryError as exc:
            return error_reply(400, str(exc)), None
        return Reply(200, msgspec.json.encode(view.top(parsed))), None

    def when_durable(self, conn: HttpProtocol, slot: Slot, pending: Pending) -> None:
        """Call ``conn.committed(slot, pending, future)`` once ``pending`` is durable.

        A group commit covers the requests of many connections; releasing them
        from one callback saves a scheduled callback per request.
        """
        fut = pending.durable
        entry = self._waiting.get(fut)
        if entry is None:
            entry = self._waiting[fut] = (self.now, [])
            fut.add_done_callback(self._release)
        entry[1].append((conn, slot, pending))

    def _release(self, fut: asyncio.Future[Any]) -> None:
        entry = self._waiting.pop(fut, None)
        if entry is None:
            return  # its requests were answered 503 by the commit timeout
        for conn, slot, pending in entry[1]:
            conn.committed(slot, pending, fut)

    def _expire_commits(self, now: float) -> None:
        """Answer 503 to requests whose group commit outlasted limits.commit_timeout_s."""
        oldest = now - self.commit_timeout_s
        expired = []
        for fut, (since, waiters) in self._waiting.items():
            if since > oldest:
                break  # insertion order is waiting order
            expired.append(fut)
            for conn, slot, _ in waiters:
                conn.commit_timed_out(slot)
        for fut in expired:
            del self._waiting[fut]

    def write_soon(self, conn: HttpProtocol) -> None:
        """Have ``conn`` write its ready responses after this loop pass's callbacks.

        Responses completed by one group commit then go out in one send per
        connection, and the whole commit costs one scheduled callback.
        """
        to_write = self._to_write
        to_write.append(conn)
        if len(to_write) == 1:
            self.loop.call_soon(self._write_all)

    def _write_all(self) -> None:
        to_write, self._to_write = self._to_write, []
        for conn in to_write:
            try:
                conn.write_ready()
            except Exception as exc:  # noqa: BLE001 (one connection must not strand the others)
                self.report(exc, "writing responses failed")
                if conn.transport is not None:
                    conn.transport.abort()

    def report(self, exc: BaseException, message: str) -> None:
        """A failure serving one connection: logged with its traceback, throttled."""
        self.errors.error(message, exc)

    def count_request(self, path: bytes, status: int) -> None:
        """Count an answered request under a bounded set of path labels."""
        metrics.REQUESTS.count(PATH_LABELS.get(path, "other"), status)

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen (SO_REUSEPORT, so sibling workers can share the port)."""
        loop = self.loop
        limits = self.cfg.limits
        if sock is not None:
            self._server = await loop.create_server(
                lambda: HttpProtocol(limits, self), sock=sock, backlog=BACKLOG
            )
        else:
            self._server = await loop.create_server(
                lambda: HttpProtocol(limits, self), host, port, reuse_port=True, backlog=BACKLOG
            )
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.now = now = loop.time()
            for conn in [c for c in self.connections if c.deadline < now]:
                conn.expire()
            self._expire_commits(now)

    async def drain(self, grace_s: float, timeout_s: float) -> None:
        """Fail /readyz, keep serving ``grace_s``, stop accepting, finish in-flight."""
        self.draining = True
        if grace_s > 0:
            await asyncio.sleep(grace_s)
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.connections and loop.time() < deadline:
            for conn in list(self.connections):
                conn.shutdown()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
        if self._server is not None:
            await self._server.wait_closed()
