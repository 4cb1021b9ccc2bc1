"""This process as a worker of the server, for the metrics.

``start_worker`` seals the layout, maps the worker's file (under a supervisor)
and publishes, every PUBLISH_INTERVAL_S, what other workers read but only this
one knows: its log's pending bytes and whether it would serve. ``stop_worker``
undoes it. The families of the workers themselves (up, restarts, pending
bytes, readiness) are reported here, from the supervisor's HostState.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from evd.core.host import HostState
from evd.core.metrics.kinds import Family, Metric, Reading
from evd.core.metrics.slots import HOT, open_own, seal, worker_file

__all__ = ["PUBLISH_INTERVAL_S", "WORKER", "Worker", "set_ready", "start_worker", "stop_worker"]

#: How often a worker publishes the gauges others read (pending bytes, readiness).
PUBLISH_INTERVAL_S = 0.25


@dataclass
class Worker:
    """This process's place in the server, as ``start_worker`` set it."""

    run_dir: Path | None = None
    index: int = 0
    workers: int = 1
    pending_bytes: Callable[[], int] | None = None
    serving: Callable[[], bool] | None = None
    timer: asyncio.TimerHandle | None = None
    #: Which workers are up and how often each restarted (the supervisor's, or
    #: this process alone).
    host: HostState = field(default_factory=HostState.alone)

    def publish(self) -> None:
        """Write the gauges that other workers read but only this one knows."""
        if self.pending_bytes is not None:
            HOT.counts[_STATE.pending] = self.pending_bytes()
        if self.serving is not None:
            HOT.counts[_STATE.serving] = int(self.serving())

    def tick(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no event loop (a tool, a test): published at scrape time only
        if loop is not None:
            self.timer = loop.call_later(PUBLISH_INTERVAL_S, self.tick)
        self.publish()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.host.close()
        self.run_dir, self.index, self.workers = None, 0, 1
        self.pending_bytes = self.serving = self.timer = None
        self.host = HostState.alone()


WORKER = Worker()


class _WorkerState(Metric):
    """The slots of a running worker's state, and the families of the workers."""

    resets = True

    def __init__(self) -> None:
        #: What /readyz or /metrics last saw here (set_ready): the server's
        #: readiness for a process that publishes no serving flag (a Server
        #: built in-process).
        self.ready = 0
        #: 1 while the worker itself would serve (not draining, its log
        #: writable), as it publishes it; whether every worker is up is read
        #: at scrape time instead.
        self.serving = 0
        #: The worker's log's bytes waiting for a flush, as it publishes it.
        self.pending = 0
        super().__init__("evd_worker_state", "A running worker's state", 3)

    def place(self, first: int) -> None:
        self.ready, self.serving, self.pending = first, first + 1, first + 2

    def families(self, reading: Reading) -> Iterator[Family]:
        host, up, live = WORKER.host, reading.up, reading.live
        if WORKER.serving is not None:
            ready = all(up) and all(c[self.serving] for c, _ in live)
        else:
            ready = bool(HOT.counts[self.ready])
        yield GaugeMetricFamily(
            "evd_ready", "1 when /readyz answers 200 (every worker up and serving)", ready
        )
        worker_up = GaugeMetricFamily(
            "evd_worker_up", "1 while the worker serves", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "evd_worker_restarts", "Times the supervisor restarted the worker", labels=["worker"]
        )
        pending = GaugeMetricFamily(
            "evd_log_pending_bytes", "Bytes the worker's log holds for its next flush",
            labels=["worker"],
        )
        for k, view in enumerate(reading.views):
            label = [str(k)]
            worker_up.add_metric(label, up[k])
            restarts.add_metric(label, host.restarts(k) if k < host.workers else 0)
            pending.add_metric(label, view[0][self.pending] if view is not None and up[k] else 0)
        yield worker_up
        yield restarts
        yield pending


_STATE = _WorkerState()


def set_ready(ready: bool) -> None:
    """What /readyz or /metrics saw here: the server's readiness when this process
    publishes no serving flag."""
    HOT.counts[_STATE.ready] = int(ready)


def start_worker(
    run_dir: Path | None,
    index: int,
    workers: int,
    pending_bytes: Callable[[], int],
    serving: Callable[[], bool] | None = None,
) -> None:
    """Make this process worker ``index`` of ``workers`` for the metrics.

    Seals the layout: every module that declares metrics must be imported
    before. With a ``run_dir``, count into ``<run_dir>/metrics/w<index>.bin``
    (going on from its counts when worker ``index`` ran before) and read the
    other workers' files, and the supervisor's HostState, at scrape time.
    ``pending_bytes`` (the log's bytes waiting for a flush) and ``serving``
    (whether this worker would serve: not draining, its log writable) are
    published now and every PUBLISH_INTERVAL_S for the other workers' scrapes,
    when called from the worker's event loop (as it should be, before it
    listens). ``stop_worker`` undoes it.
    """
    layout = seal()
    stop_worker()
    if run_dir is not None:
        HOT.use(open_own(worker_file(run_dir, index)))
        WORKER.host = HostState.attach(run_dir)
    for slot in layout.reset_slots:
        HOT.counts[slot] = 0
    WORKER.run_dir = run_dir
    WORKER.index = index
    WORKER.workers = workers
    WORKER.pending_bytes = pending_bytes
    WORKER.serving = serving
    WORKER.tick()


def stop_worker() -> None:
    """Stop publishing; count into a private buffer again (starting from the current counts)."""
    WORKER.stop()
    HOT.counts[_STATE.ready] = HOT.counts[_STATE.serving] = HOT.counts[_STATE.pending] = 0
    if isinstance(HOT.buffer, mmap.mmap):
        old = HOT.use(bytearray(HOT.buffer[: HOT.size * 8]))
        assert isinstance(old, mmap.mmap)
        old.close()
