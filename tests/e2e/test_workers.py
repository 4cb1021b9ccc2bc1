"""``evd serve --workers N``: a supervisor and N worker processes on one port.

Connections spread over the workers; a worker killed under load loses no
acknowledged event and is replaced while the others keep answering; workers
that keep dying, or cannot start, make the supervisor give up with a message;
SIGTERM drains every worker and exits 0 with every acknowledged event durable.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from evdtest import (
    HOST,
    EvdServer,
    ServerFactory,
    batch,
    close_writer,
    make_event,
    post,
    raw_post,
    request,
)

from evd.logtool import iter_stream

TWO = ["--workers", "2"]


def logged(data_dir: Path) -> list[dict[str, object]]:
    return list(iter_stream(data_dir, "raw"))


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


async def post_many(port: int, prefix: str, connections: int, rounds: int) -> set[str]:
    """POSTs on many connections at once (each a fresh one); the event ids answered 200."""
    acked: set[str] = set()

    async def one(c: int) -> None:
        for r in range(rounds):
            ids = [f"{prefix}-{c}-{r}-{j}" for j in range(3)]
            body = batch(make_event(eid, user_id=f"u-{c}-{j}") for j, eid in enumerate(ids))
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                continue
            try:
                writer.write(raw_post(body, close=True))
                data = await asyncio.wait_for(reader.read(), 20)
            except (OSError, TimeoutError):
                continue
            finally:
                await close_writer(writer)
            if data.startswith(b"HTTP/1.1 200"):
                acked.update(ids)

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(connections))), 90)
    return acked


def test_connections_land_on_every_worker(servers: ServerFactory) -> None:
    server = servers.start(args=TWO)
    # /readyz answers once one worker listens; the other may still be starting its
    # processors (on a busy machine, seconds later).
    wait_for(lambda: sorted(server.worker_pids()) == [0, 1], 30, "both workers to listen")
    acked = asyncio.run(post_many(server.port, "spread", 40, 3))
    assert len(acked) == 40 * 3 * 3
    records = logged(server.data_dir)
    assert {r["event_id"] for r in records} == acked
    # Each worker writes its own sub-logs: both took connections.
    assert {r["writer"] for r in records} == {0, 1}


def test_a_worker_killed_under_load_loses_nothing_and_is_replaced(servers: ServerFactory) -> None:
    server = servers.start(args=TWO)
    victim = server.worker_pids()[1]

    async def load_and_kill() -> set[str]:
        loading = asyncio.ensure_future(post_many(server.port, "k1", 100, 5))
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        return await loading

    acked = asyncio.run(load_and_kill())
    assert acked, "nothing was acknowledged"
    wait_for(lambda: server.worker_pids()[1] != victim, 20, "a replacement for worker 1")
    server.wait_ready()
    assert "restarting worker 1" in server.log_text()
    assert post(server.port, batch([make_event("after-kill")])).status == 200
    assert server.stop() == 0
    ids = {r["event_id"] for r in logged(server.data_dir)}
    assert acked - ids == set()
    assert "after-kill" in ids


def test_readyz_waits_for_every_worker(servers: ServerFactory) -> None:
    server = servers.start(args=TWO)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Once the supervisor saw it die, and until its replacement is up, the
    # surviving worker is not ready either.
    def unready() -> bool:
        try:
            r = request(server.port, "GET", "/readyz")
        except OSError:
            return False  # a connection queued on the killed worker's socket is reset
        return r.status == 503 and r.json()["reason"] == "waiting for workers: 1 of 2 up"

    wait_for(unready, 5, "readyz 503 while a worker is down")
    server.wait_ready()
    assert server.worker_pids()[0] != victim


def test_workers_that_keep_dying_make_the_supervisor_give_up(servers: ServerFactory) -> None:
    server = servers.start(args=TWO)
    deadline = time.monotonic() + 60
    killed: set[int] = set()
    while server.proc.poll() is None and time.monotonic() < deadline:
        for pid in server.worker_pids().values():
            if pid not in killed:
                killed.add(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    assert server.proc.wait(20) == 1
    assert "giving up" in server.log_text()


def test_a_worker_that_cannot_start_stops_the_server(servers: ServerFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # Worker 1's journal directory cannot be made: it fails at every start.
    (data_dir / "log" / "_journal").mkdir(parents=True)
    (data_dir / "log" / "_journal" / "w001").write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "-m", "evd", "serve", "--port", "0", "--data-dir", str(data_dir),
         *TWO],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "worker 1 cannot start" in proc.stderr


def test_sigterm_with_two_workers_under_load_exits_0_with_every_ack_durable(
    servers: ServerFactory,
) -> None:
    server: EvdServer = servers.start({"log": {"fsync": "always"}}, args=TWO)

    async def load_and_stop() -> set[str]:
        loading = asyncio.ensure_future(post_many(server.port, "term", 60, 5))
        await asyncio.sleep(0.3)
        server.signal(signal.SIGTERM)
        return await loading

    acked = asyncio.run(load_and_stop())
    assert server.proc.wait(30) == 0
    assert acked
    ids = {r["event_id"] for r in logged(server.data_dir)}
    assert acked - ids == set()


def test_auto_is_one_worker_per_cpu_of_the_affinity_mask(servers: ServerFactory) -> None:
    # A one-CPU container: auto is one worker.
    pinned = ["taskset", "-c", "0", sys.executable, "-m", "evd"]
    server = servers.start(args=["--workers", "auto"], launcher=pinned)
    assert sorted(server.worker_pids()) == [0]
    assert "(worker 0 of 1," in server.log_text()
    assert post(server.port, batch([make_event("auto-1")])).status == 200
