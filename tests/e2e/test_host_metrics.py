"""/metrics reports the whole server, whichever worker answers.

Worker processes here are real (multiprocessing "spawn", as the supervisor
starts them) and share a run dir the way a supervisor's workers do: each
counts into its own mapped file, and a scrape on either sums both, keeps the
counts of a worker that died, and lets a restarted worker go on from them.
The last tests do the same through ``evd serve --workers 2``.
"""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from evdtest import ServerFactory, batch, exchange, make_event, raw_post, request
from prometheus_client.parser import text_string_to_metric_families

from evd.core.host import HostState
from evd.core.log.embedded.metrics import LOG_BYTES_WRITTEN, LOG_FLUSH_SECONDS
from evd.core.metrics.exposition import render
from evd.core.metrics.lifecycle import start_worker, stop_worker
from evd.core.metrics.slots import HOT, read, seal, worker_file
from evd.edge import ingest
from evd.edge.http import STATUS_LINES
from evd.edge.metrics import (
    ACCEPTED,
    CONNECTIONS,
    PATHS,
    RECEIVED,
    REJECT_REASONS,
    REJECTED,
    REQUEST_SECONDS,
    REQUESTS,
    STATUSES,
)
from evd.edge.routes import PATH_LABELS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: bytes) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def worker(run_dir: Path, index: int, workers: int, conn: Connection) -> None:
    """A worker process: does what the parent asks, one command at a time."""
    start_worker(
        run_dir, index, workers, pending_bytes=lambda: 100 + index, serving=lambda: True
    )
    while True:
        command, arg = conn.recv()
        if command == "count":
            count(int(arg))
            conn.send(None)
        elif command == "scrape":
            conn.send(render())
        elif command == "exit":
            conn.send(None)
            return


def count(n: int) -> None:
    """What ``n`` single-event POSTs and one open connection count."""
    for _ in range(n):
        HOT.counts[RECEIVED.slot] += 1
        HOT.counts[ACCEPTED.slot] += 1
        REQUESTS.count("/v1/events", 200)
        REQUEST_SECONDS.observe(0.003)
    REJECTED.inc("invalid", n)
    LOG_FLUSH_SECONDS.observe(0.0007)
    LOG_BYTES_WRITTEN.inc(1000 * n)
    CONNECTIONS.inc()


class Workers:
    """Worker processes on one run dir, and the supervisor's HostState for them."""

    def __init__(self, run_dir: Path, n: int) -> None:
        self.run_dir = run_dir
        self.n = n
        self.host = HostState.create(run_dir, n)
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple[multiprocessing.process.BaseProcess, Connection]] = {}

    def start(self, k: int) -> None:
        ours, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(self.run_dir, k, self.n, theirs))
        proc.start()
        theirs.close()
        self.procs[k] = (proc, ours)
        self.host.set_up(k, True)

    def ask(self, k: int, command: str, arg: object = None) -> object:
        conn = self.procs[k][1]
        conn.send((command, arg))
        if not conn.poll(30):
            raise AssertionError(f"worker {k} did not answer {command}")
        return conn.recv()

    def scrape(self, k: int) -> Samples:
        text = self.ask(k, "scrape")
        assert isinstance(text, bytes)
        return parse(text)

    def stop(self, k: int, restart: bool = False) -> None:
        """Worker ``k`` exits, and the supervisor marks it down (and counts a restart)."""
        self.ask(k, "exit")
        proc, conn = self.procs.pop(k)
        proc.join(30)
        conn.close()
        self.host.set_up(k, False)
        if restart:
            self.host.add_restart(k)

    def close(self) -> None:
        for proc, conn in self.procs.values():
            proc.kill()
            proc.join(10)
            conn.close()
        self.host.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    w = Workers(tmp_path / "run", 2)
    try:
        yield w
    finally:
        w.close()


def test_a_scrape_on_either_worker_reports_the_sum_of_both(workers: Workers) -> None:
    workers.start(0)
    workers.start(1)
    workers.ask(0, "count", 3)
    workers.ask(1, "count", 5)
    scrapes = [workers.scrape(0), workers.scrape(1)]
    # The per-scrape metrics move between the two scrapes; everything else is equal.
    moving = {"evd_http_requests_total"}
    assert {k: v for k, v in scrapes[0].items() if k[0] not in moving} == {
        k: v for k, v in scrapes[1].items() if k[0] not in moving
    }
    for s in scrapes:
        assert value(s, "evd_events_received_total") == 8
        assert value(s, "evd_events_accepted_total") == 8
        assert value(s, "evd_events_rejected_total", reason="invalid") == 8
        assert value(s, "evd_events_rejected_total", reason="rate_limited") == 0
        assert value(s, "evd_http_requests_total", path="/v1/events", status="200") == 8
        assert value(s, "evd_request_duration_seconds_count") == 8
        assert value(s, "evd_request_duration_seconds_bucket", le="0.005") == 8
        assert value(s, "evd_request_duration_seconds_bucket", le="0.002") == 0
        assert value(s, "evd_request_duration_seconds_sum") == pytest.approx(8 * 0.003)
        assert value(s, "evd_log_append_seconds_count") == 2
        assert value(s, "evd_log_append_seconds_bucket", le="0.001") == 2
        assert value(s, "evd_log_written_bytes_total") == 8000
        assert value(s, "evd_http_connections") == 2
        assert value(s, "evd_ready") == 1
        for k, received in ((0, 3), (1, 5)):
            assert value(s, "evd_worker_up", worker=str(k)) == 1
            assert value(s, "evd_worker_restarts_total", worker=str(k)) == 0
            assert value(s, "evd_worker_events_received_total", worker=str(k)) == received
            assert value(s, "evd_log_pending_bytes", worker=str(k)) == 100 + k


def test_a_dead_workers_counts_stay_and_its_replacement_goes_on(workers: Workers) -> None:
    workers.start(0)
    workers.start(1)
    workers.ask(0, "count", 2)
    workers.ask(1, "count", 5)
    workers.stop(1, restart=True)
    s = workers.scrape(0)
    assert value(s, "evd_events_received_total") == 7
    assert value(s, "evd_worker_events_received_total", worker="1") == 5
    # What only means something while a worker runs counts for live workers only.
    assert value(s, "evd_worker_up", worker="1") == 0
    assert value(s, "evd_http_connections") == 1
    assert value(s, "evd_log_pending_bytes", worker="1") == 0
    assert value(s, "evd_ready") == 0

    workers.start(1)
    workers.ask(1, "count", 1)
    for k in (0, 1):
        s = workers.scrape(k)
        assert value(s, "evd_events_received_total") == 8
        assert value(s, "evd_worker_events_received_total", worker="1") == 6
        assert value(s, "evd_worker_restarts_total", worker="1") == 1
        assert value(s, "evd_worker_up", worker="1") == 1
        assert value(s, "evd_http_connections") == 2  # the dead worker's one is gone
        assert value(s, "evd_ready") == 1


def test_a_worker_not_started_yet_counts_as_down(workers: Workers) -> None:
    workers.start(0)
    workers.host.set_up(1, False)
    workers.ask(0, "count", 1)
    s = workers.scrape(0)
    assert value(s, "evd_events_received_total") == 1
    assert value(s, "evd_worker_up", worker="1") == 0
    assert value(s, "evd_worker_events_received_total", worker="1") == 0
    assert value(s, "evd_ready") == 0


def test_without_a_run_dir_a_scrape_reads_this_process_alone() -> None:
    before = parse(render())
    HOT.counts[RECEIVED.slot] += 4
    REQUESTS.count("other", 404)
    after = parse(render())
    assert value(after, "evd_events_received_total") == value(before, "evd_events_received_total") + 4
    assert value(after, "evd_worker_up", worker="0") == 1
    assert value(after, "evd_worker_events_received_total", worker="0") == value(
        after, "evd_events_received_total"
    )
    assert ("evd_worker_up", (("worker", "1"),)) not in after


@pytest.fixture
def own_counts() -> Iterator[None]:
    """This process's counts are put back after the test (it makes the process a worker)."""
    saved = bytes(HOT.buffer[: seal().size * 8])
    try:
        yield
    finally:
        stop_worker()
        HOT.buffer[:] = saved


@pytest.mark.usefixtures("own_counts")
def test_start_maps_the_workers_file_and_stop_goes_on_from_it(tmp_path: Path) -> None:
    """start_worker counts from the file's counts; stop_worker goes on privately from there."""
    run = tmp_path / "run"
    HostState.create(run, 1).close()
    start_worker(run, 0, 1, pending_bytes=lambda: 0)
    HOT.counts[RECEIVED.slot] += 2
    assert worker_file(run, 0).exists()
    assert value(parse(render()), "evd_events_received_total") == 2
    stop_worker()
    HOT.counts[RECEIVED.slot] += 1
    assert HOT.counts[RECEIVED.slot] == 3
    assert not isinstance(HOT.buffer, mmap.mmap)


@pytest.mark.usefixtures("own_counts")
def test_ready_needs_every_worker_up_and_serving(tmp_path: Path) -> None:
    run = tmp_path / "run"
    host = HostState.create(run, 1)
    serving = [True]
    start_worker(run, 0, 1, pending_bytes=lambda: 0, serving=lambda: serving[0])
    try:
        assert value(parse(render()), "evd_ready") == 0  # not up yet
        host.set_up(0, True)
        assert value(parse(render()), "evd_ready") == 1
        serving[0] = False  # draining, or the log turned read-only
        assert value(parse(render()), "evd_ready") == 0
    finally:
        host.close()


@pytest.mark.usefixtures("own_counts")
def test_a_file_of_another_layout_is_neither_read_nor_continued(tmp_path: Path) -> None:
    run = tmp_path / "run"
    HostState.create(run, 1).close()
    path = worker_file(run, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x01" * seal().file_size)
    assert read(path) is None
    start_worker(run, 0, 1, pending_bytes=lambda: 0)
    assert HOT.counts[RECEIVED.slot] == 0
    assert read(path) is not None


def test_every_label_the_edge_uses_has_its_slot() -> None:
    assert set(PATH_LABELS.values()) | {"other"} == set(PATHS)
    assert set(STATUS_LINES) <= set(STATUSES)
    text = Path(ingest.__file__).read_text()
    mark = 'REJECTED.inc("'
    used = {line.split(mark)[1].split('"')[0] for line in text.splitlines() if mark in line}
    assert used == set(REJECT_REASONS)


# -- through evd serve --workers 2 ---------------------------------------------------------

TWO = ["--workers", "2"]


def scrape(port: int) -> Samples:
    """GET /metrics on a fresh connection (SO_REUSEPORT picks the worker)."""
    r = request(port, "GET", "/metrics")
    assert r.status == 200
    return parse(r.body)


async def post_spread(port: int, prefix: str, requests: int, events: int) -> list[int]:
    """``requests`` POSTs of ``events`` events, each on a fresh connection (so they
    spread over the workers), 16 at a time; their statuses."""
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> int:
        ids = [f"{prefix}-{i}-{j}" for j in range(events)]
        body = batch(make_event(eid, user_id=f"u-{i}-{j}") for j, eid in enumerate(ids))
        async with limit:
            return (await exchange(port, raw_post(body, close=True))).status

    return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))), 60))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_every_scrape_reports_the_servers_totals_whichever_worker_answers(
    servers: ServerFactory,
) -> None:
    server = servers.start(args=TWO)
    assert asyncio.run(post_spread(server.port, "total", 60, 3)) == [200] * 60
    scrapes = [scrape(server.port) for _ in range(30)]
    for s in scrapes:
        assert value(s, "evd_events_received_total") == 180
        assert value(s, "evd_events_accepted_total") == 180
        assert value(s, "evd_http_requests_total", path="/v1/events", status="200") == 60
        assert value(s, "evd_request_duration_seconds_count") == 60
        assert value(s, "evd_ready") == 1
        per_worker = [value(s, "evd_worker_events_received_total", worker=k) for k in "01"]
        assert sum(per_worker) == 180
        assert all(per_worker), per_worker  # the POSTs went to both workers
        assert [value(s, "evd_worker_up", worker=k) for k in "01"] == [1, 1]
    # Only scrapes came in between: both workers answered some of them.
    for k in "01":
        first = value(scrapes[0], "evd_worker_requests_total", worker=k)
        assert value(scrapes[-1], "evd_worker_requests_total", worker=k) > first, k


def test_a_killed_workers_counts_stay_and_its_restart_is_counted(servers: ServerFactory) -> None:
    server = servers.start(args=TWO)
    assert asyncio.run(post_spread(server.port, "kill", 40, 2)) == [200] * 40
    before = scrape(server.port)
    victim = server.worker_pids()[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: server.worker_pids()[1] != victim, 20, "a replacement for worker 1")
    server.wait_ready()
    for _ in range(10):
        s = scrape(server.port)
        assert value(s, "evd_events_received_total") == 80
        assert value(s, "evd_events_accepted_total") == 80
        for k in "01":
            assert value(s, "evd_worker_events_received_total", worker=k) == value(
                before, "evd_worker_events_received_total", worker=k
            )
            assert value(s, "evd_worker_up", worker=k) == 1
        assert value(s, "evd_worker_restarts_total", worker="0") == 0
        assert value(s, "evd_worker_restarts_total", worker="1") == 1
