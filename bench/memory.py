"""Resident memory of ``evd serve --workers 1`` (default config) under a closed-loop load.

Starts the server on a free loopback port with a temporary data dir, sends
seed-shaped batches stamped with the wall clock and unique ids (``bench/pipeline.py``'s
load) whose users are drawn from only ``--users`` distinct ids (few users: a few
enormous sessions), and at each of ``--at`` seconds after the load began reads
``RssAnon`` (the heap and other anonymous pages, not the log's file pages) and
``RssFile`` from ``/proc/<pid>/status`` of every process of the server, with the
events accepted by then. Prints one line per sample and writes ``memory.json``
to ``--out``.

    python -m bench.memory --batch 100 --users 100 --at 20,60 --server-cpu 0 --load-cpu 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.pipeline import TIME_STAMP, Paced, PacedLoad, free_port
from bench.scaling import tree_cpu
from bench.seedload import STAMP, batch_body, seed_event
from bench.versus import _pinned, _ready
from evd.bench.http import Target

#: Distinct request bodies (each a different draw of users).
BODIES = 64


def templates(batch: int, users: int, key: str, target: Target, seed: int) -> list[bytes]:
    """Whole POSTs of ``batch`` seed events, users drawn from ``users`` ids, ids and
    timestamps as placeholders (``STAMP``, ``TIME_STAMP``) that each send fills in."""
    rng = random.Random(seed)
    seed_time = str(seed_event()["timestamp"]).encode()
    out = []
    for _ in range(BODIES):
        body = batch_body(batch, STAMP.decode(), lambda _: f"user-{rng.randrange(users)}")
        body = body.replace(seed_time, TIME_STAMP.encode())
        head = (
            f"POST {target.prefix}/v1/events HTTP/1.1\r\nHost: {target.host_header()}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


def status_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of ``pid`` in KiB (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
    except OSError:
        return {}
    return out


async def load_and_sample(args: argparse.Namespace, port: int, root: int) -> list[dict[str, Any]]:
    target = Target.parse(f"http://127.0.0.1:{port}")
    load = PacedLoad(templates(args.batch, args.users, "evd-dev-key", target, args.seed),
                     b"%08x" % random.getrandbits(32), args.seed, count_accepted=True)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    load.t0 = start
    load.interval = 0.0
    load.start, load.stop = start, start + max(args.at)
    load.end = load.stop
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Paced(load), target.host, target.port)
        load.conns.append(conn)
    samples: list[dict[str, Any]] = []
    for at in sorted(args.at):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        procs = {pid: status_kib(pid) for pid in tree_cpu(root)}
        samples.append({"at_s": at, "accepted": load.accepted, "statuses": dict(load.statuses),
                        "procs": procs})
        anon = {pid: s.get("RssAnon", 0) for pid, s in procs.items()}
        print(f"{at:6.1f} s: {load.accepted:,} events accepted; RssAnon MiB by pid "
              + ", ".join(f"{pid}: {kib / 1024:.0f}" for pid, kib in sorted(anon.items()))
              + f"; total {sum(anon.values()) / 1024:.0f}", flush=True)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in load.conns)), 30)
    for conn in load.conns:
        conn.close()
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100, help="events per request")
    p.add_argument("--users", type=int, default=100, help="distinct user ids")
    p.add_argument("--at", type=lambda s: [float(x) for x in s.split(",")], default=[20.0, 60.0],
                   help="seconds after the load began to sample at (the last ends the load)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-cpu", type=int, default=None, help="pin the server to this CPU")
    p.add_argument("--load-cpu", type=int, default=None, help="pin the load to this CPU")
    p.add_argument("--config", type=Path, default=None, help="evd config file (else defaults)")
    p.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memory-evd-") as tmp:
        port = free_port()
        cmd = [sys.executable, "-m", "evd", "serve", "--workers", "1", "--port", str(port),
               "--data-dir", str(Path(tmp) / "data")]
        if args.config is not None:
            cmd += ["--config", str(args.config)]
        proc = _pinned(cmd, None if args.server_cpu is None else {args.server_cpu}, Path(tmp) / "evd.log", dict(os.environ))
        try:
            _ready(port, proc)
            if args.load_cpu is not None:
                os.sched_setaffinity(0, {args.load_cpu})
            samples = uvloop.run(load_and_sample(args, port, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(
        {"batch": args.batch, "users": args.users, "connections": args.connections,
         "samples": samples}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
