"""No acknowledged event is lost: kill -9 under load, torn tails across a restart,
an fsync failure (503, not ready), SIGTERM draining and flushing."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from evdtest import (
    HOST,
    RawConn,
    ServerFactory,
    batch,
    close_writer,
    exchange,
    make_event,
    post,
    raw_get,
    raw_post,
    request,
)
from powercut import cut_power

from evd.config import load_config, with_overrides
from evd.edge.ingest import Ingest
from evd.edge.server import Server
from evd.logtool import iter_stream
from evd.worker import open_log

POWERCUT = Path(__file__).parents[1] / "support" / "powercut.py"


def logged_ids(data_dir: Path, stream: str = "raw") -> set[str]:
    return {e["event_id"] for e in iter_stream(data_dir, stream)}


def missing_ids(acknowledged: set[str], logged: set[str]) -> set[str]:
    """Acknowledged event ids the log does not hold (must be empty)."""
    return acknowledged - logged


# -- kill -9 under load ------------------------------------------------------------------

CONNECTIONS = 1000
#: POSTs each connection sends one after another (keep-alive) until the kill.
ROUNDS = 5
EVENTS_PER_POST = 3
#: The kill comes after this many acknowledged POSTs, with about CONNECTIONS more in flight.
KILL_AFTER_ACKS = 1000


async def fire_and_kill(port: int, pid: int) -> tuple[list[str], set[str]]:
    """1,000 connections POSTing concurrently; SIGKILL the server mid-load.

    Each connection keeps one POST in flight at a time, so at the kill about a
    thousand POSTs are outstanding. Returns every POST's outcome and the event ids
    of those answered 200.
    """
    outcomes: list[str] = []
    acked: set[str] = set()
    killed = False

    async def connection(c: int) -> None:
        nonlocal killed
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError as exc:
            outcomes.append(type(exc).__name__)
            return
        try:
            for r in range(ROUNDS):
                ids = [f"k9-{c}-{r}-{j}" for j in range(EVENTS_PER_POST)]
                body = batch(make_event(eid, user_id=f"user-{c}-{j}") for j, eid in enumerate(ids))
                writer.write(raw_post(body))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                status = int(head.split(b" ", 2)[1])
                match = re.search(rb"Content-Length: (\d+)", head)
                assert match is not None
                length = int(match.group(1))
                payload = await asyncio.wait_for(reader.readexactly(length), 30)
                outcomes.append(str(status))
                if status != 200:
                    return
                assert json.loads(payload)["accepted"] == EVENTS_PER_POST
                acked.update(ids)
                if not killed and len(acked) >= KILL_AFTER_ACKS * EVENTS_PER_POST:
                    killed = True
                    os.kill(pid, signal.SIGKILL)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            outcomes.append(type(exc).__name__)
        finally:
            await close_writer(writer)

    await asyncio.wait_for(asyncio.gather(*(connection(c) for c in range(CONNECTIONS))), 90)
    return outcomes, acked


@pytest.mark.parametrize(
    ("fsync", "survives"),
    [
        ("always", True),
        # Negative control: without fsync, the power cut takes acknowledged events
        # away, and the check has to notice.
        ("never", False),
    ],
)
async def test_kill_9_and_a_power_cut_during_load_lose_no_acknowledged_event(
    servers: ServerFactory, tmp_path: Path, fsync: str, survives: bool
) -> None:
    config = {"log": {"fsync": fsync, "partitions": 8}}
    record = tmp_path / "fsyncs.tsv"
    server = servers.start(config, launcher=[sys.executable, str(POWERCUT), str(record)])
    outcomes, acked = await fire_and_kill(server.port, server.proc.pid)
    assert server.proc.wait(15) == -signal.SIGKILL
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"POST outcomes around the SIGKILL: {counts}")
    n_ok = counts.get("200", 0)
    assert n_ok >= KILL_AFTER_ACKS
    assert len(outcomes) > n_ok, "the kill landed after the load: nothing was in flight"
    assert set(counts) <= {"200", "ConnectionResetError", "ConnectionRefusedError",
                           "IncompleteReadError", "BrokenPipeError", "TimeoutError"}

    # The power goes too: every byte no fsync covered is gone.
    dropped = cut_power(server.data_dir / "log", record)
    print(f"bytes the power cut dropped: {sum(dropped.values())} in {len(dropped)} files")
    restarted = servers.start(config, data_dir=server.data_dir)  # recovery, then ready
    logged = logged_ids(restarted.data_dir)
    if survives:
        assert missing_ids(acked, logged) == set()
    else:
        assert dropped and missing_ids(acked, logged)
    # The recovered log takes new appends after whatever the kill left.
    assert post(restarted.port, batch([make_event("k9-after-restart")])).status == 200
    assert "k9-after-restart" in logged_ids(restarted.data_dir)
    assert restarted.stop() == 0


# -- torn tail across a real restart ------------------------------------------------------


def test_server_restart_truncates_a_torn_last_record(servers: ServerFactory) -> None:
    config = {"log": {"partitions": 1}}
    # One writer, so that the three records are one sub-log's last three.
    server = servers.start(config, args=["--workers", "1"])
    for i in range(3):
        body = batch([make_event(f"torn-{i}-{j}", user_id=f"u{j}") for j in range(4)])
        assert post(server.port, body).status == 200
    assert server.stop() == 0

    # The last segment written, of whichever worker (writer) took the last POST.
    seg = max((server.data_dir / "log" / "raw" / "0000").glob("w*/*.seg"),
              key=lambda p: p.stat().st_mtime_ns)
    size = seg.stat().st_size
    os.truncate(seg, size - 5)  # a crash mid-write of the third record

    restarted = servers.start(config, data_dir=server.data_dir, args=["--workers", "1"])
    match = re.search(r"log raw/0: truncated (\d+) bytes of torn or corrupt tail at offset (\d+)",
                      restarted.log_text())
    assert match, restarted.log_text()
    dropped, offset = int(match.group(1)), int(match.group(2))
    assert offset + dropped == size - 5
    assert seg.stat().st_size == offset
    logged = logged_ids(restarted.data_dir)
    assert {f"torn-{i}-{j}" for i in range(2) for j in range(4)} <= logged
    assert not logged & {f"torn-2-{j}" for j in range(4)}
    assert post(restarted.port, batch([make_event("torn-after")])).status == 200
    assert "torn-after" in logged_ids(restarted.data_dir)


# -- fsync failure (in-process server) --------------------------------------------------------


def failing_fsync(fd: int) -> None:
    raise OSError(errno.EIO, "injected EIO")


async def test_fsync_failure_answers_503_and_fails_readyz(tmp_path: Path) -> None:
    cfg = with_overrides(load_config(None, environ={}), data_dir=str(tmp_path))
    lg = open_log(cfg)
    server = Server(cfg, lg, Ingest(cfg, lg))
    await server.start(HOST, 0)
    port = server.port
    try:
        ok = await exchange(port, raw_post(batch([make_event("eio-ok")]), close=True))
        assert ok.status == 200
        assert (await exchange(port, raw_get("/readyz", close=True))).status == 200

        lg.fsync_fn = failing_fsync
        failed = await exchange(port, raw_post(batch([make_event("eio-1")]), close=True))
        assert failed.status == 503
        assert int(failed.headers["retry-after"]) >= 1
        assert "log" in failed.json()["error"]

        ready = await exchange(port, raw_get("/readyz", close=True))
        assert ready.status == 503
        assert ready.json() == {"ready": False, "reason": "log is not writable"}
        later = await exchange(port, raw_post(batch([make_event("eio-2")]), close=True))
        assert later.status == 503 and int(later.headers["retry-after"]) >= 1
        # Liveness is not readiness: the process is alive.
        assert (await exchange(port, raw_get("/healthz", close=True))).status == 200
    finally:
        await server.drain(0, 2)
        await lg.close()
    assert "eio-ok" in logged_ids(tmp_path)


# -- SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_exits_0_and_flushes_accepted_events(servers: ServerFactory) -> None:
    # fsync never: only the shutdown flush makes the data durable.
    server = servers.start({"log": {"fsync": "never", "partitions": 2}})
    events = [make_event(f"term-{i}", user_id=f"u{i}") for i in range(20)]
    assert post(server.port, batch(events)).json()["accepted"] == 20
    assert server.stop() == 0
    assert "stopped" in server.log_text()
    assert {f"term-{i}" for i in range(20)} <= logged_ids(server.data_dir)


def test_sigterm_drains_with_503_then_exits_0(servers: ServerFactory) -> None:
    config: dict[str, Any] = {
        "server": {"drain_grace_s": 2.0},
        "log": {"fsync": "interval", "fsync_interval_ms": 60_000},
    }
    server = servers.start(config)
    assert post(server.port, batch([make_event("drain-ok")])).status == 200
    with RawConn(server.port) as idle:
        idle.send(raw_get("/healthz"))
        assert idle.read_response().status == 200  # an idle keep-alive connection

        server.signal(signal.SIGTERM)
        for _ in range(200):  # /readyz fails at once; bounded to about 2 s
            r = request(server.port, "GET", "/readyz")
            if r.status == 503:
                break
            time.sleep(0.01)
        assert (r.status, r.json()) == (503, {"ready": False, "reason": "draining"})
        refused = post(server.port, batch([make_event("drain-refused")]))
        assert refused.status == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers.get("connection") == "close"

        assert server.proc.wait(15) == 0
        assert idle.wait_closed(1) is not None  # the idle connection was closed
    logged = logged_ids(server.data_dir)
    assert "drain-ok" in logged and "drain-refused" not in logged
