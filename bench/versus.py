"""evd serve with its default config against a bare FastAPI collector, per CPU-second.

One command, both servers, in one run: for each of ``--runs`` rounds, evd then
the collector (``bench/collector.py``), each started fresh and pinned to
``--server-cpu``, one alive at a time, loaded from this process on
``--load-cpu`` with seed-shaped batches stamped with the wall clock and unique
ids (``bench/pipeline.py``'s load), closed loop (each connection sends again
once answered) for ``--duration`` seconds.

The cost counted is the CPU seconds of the server's whole process tree from the
start of the load until its work is done: for evd, until every stage has caught
up (the processors' and every sink's lag 0 bytes: every accepted event is in
the lake, the warehouse and the audit), bounded by ``--drain-timeout``; for the
collector, the end of the load (its append is its whole job). The figure is
accepted events per CPU second, and the ratio evd / collector of each round.
Each round also reports the sustained rate, accepted events per second from
the start of the load until done (``events_per_s_drained``): with
``--workers 2`` against ``--workers 1`` it shows whether a stage serializes the
host. Prints a table and writes ``versus.json`` to ``--out``.

    python -m bench.versus --batch 100 --duration 10 --runs 3 --server-cpu 0 --load-cpu 1
    python -m bench.versus --workers 2 --server-cpu 0,1 --load-cpu 1 ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.pipeline import Paced, PacedLoad, free_port, scrape, templates
from bench.scaling import tree_cpu
from evd.bench import metrics
from evd.bench.http import Target

#: Longest wait for a server to answer its readiness check.
START_S = 30.0
#: How often the drain is polled.
POLL_S = 0.2


def _pinned(
    cmd: list[str], cpus: set[int] | None, log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    own = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # inherited by the server and its children
    try:
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    finally:
        os.sched_setaffinity(0, own)


def _ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on port {port} was not ready within {START_S} s")


def _caught_up(port: int) -> bool:
    """Every stage of the evd server on ``port`` has read everything (lag 0 bytes)."""
    m = scrape(port)
    if (metrics.total(m, "evd_processor_lag_bytes_sum") or 0.0) > 0:
        return False
    return all(v == 0 for v in metrics.by_label(m, "evd_sink_lag_bytes", "sink").values())


async def _load(args: argparse.Namespace, port: int) -> tuple[int, dict[str, int]]:
    """Closed-loop load for args.duration seconds: (accepted events, statuses)."""
    target = Target.parse(f"http://127.0.0.1:{port}")
    load = PacedLoad(templates(args.batch, "evd-dev-key", target, args.seed),
                     b"%08x" % random.getrandbits(32), args.seed, count_accepted=True)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    load.t0 = start
    load.interval = 0.0
    load.start, load.stop = start, start + args.duration
    load.end = load.stop
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Paced(load), target.host, target.port)
        load.conns.append(conn)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in load.conns)), args.duration + 30)
    for conn in load.conns:
        conn.close()
    return load.accepted, dict(load.statuses)


def run_server(args: argparse.Namespace, kind: str, workdir: Path) -> dict[str, Any]:
    """Start ``kind`` (evd, baseline: evd of the --baseline checkout, or collector), load
    it, count its CPU until done; stop it."""
    port = free_port()
    env = dict(os.environ)
    cwd = None
    if kind == "baseline":
        cwd = args.baseline  # ``-m evd`` imports evd from the working directory first
        env["PYTHONPATH"] = str(args.baseline)
    if kind in ("evd", "baseline"):
        cmd = [sys.executable, "-m", "evd", "serve", "--workers", str(args.workers), "--port", str(port),
               "--data-dir", str(workdir / "data")]
    else:
        cmd = [sys.executable, "-m", "bench.collector", "--port", str(port),
               "--out", str(workdir / "events.ndjson")]
    proc = _pinned(cmd, args.server_cpu, workdir / f"{kind}.log", env, cwd)
    try:
        _ready(port, proc)
        if args.load_cpu is not None:
            os.sched_setaffinity(0, {args.load_cpu})
        cpu0 = sum(tree_cpu(proc.pid).values())
        t0 = time.perf_counter()
        accepted, statuses = uvloop.run(_load(args, port))
        load_s = time.perf_counter() - t0
        drained = True
        if kind != "collector":
            deadline = time.monotonic() + args.drain_timeout
            while not _caught_up(port):
                if time.monotonic() > deadline:
                    drained = False
                    break
                time.sleep(POLL_S)
        cpu_s = sum(tree_cpu(proc.pid).values()) - cpu0
        done_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "server": kind,
        "accepted": accepted,
        "statuses": statuses,
        "load_s": round(load_s, 2),
        "done_s": round(done_s, 2),
        "drained": drained,
        "cpu_s": round(cpu_s, 3),
        "events_per_s": round(accepted / load_s) if load_s else 0,
        # Sustained: what the whole pipeline took in and delivered, per second until done.
        "events_per_s_drained": round(accepted / done_s) if done_s else 0,
        "events_per_cpu_s": round(accepted / cpu_s) if cpu_s else 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100, help="events per request")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per server")
    p.add_argument("--runs", type=int, default=3, help="rounds (evd then the collector)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-cpu", type=lambda v: {int(c) for c in v.split(",")}, default=None,
                   help="pin the servers to these CPUs (comma-separated)")
    p.add_argument("--workers", type=int, default=1, help="evd serve --workers")
    p.add_argument("--load-cpu", type=int, default=None, help="pin the load to this CPU")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="longest wait for evd's stages to catch up after the load")
    p.add_argument("--out", type=Path, default=Path("bench-out/versus"))
    p.add_argument("--baseline", type=Path, default=None,
                   help="a checkout of another evd version (say, a git worktree of the code"
                        " before a change): its evd serve runs too in every round, after"
                        " this one, and each round also prints evd / baseline")
    args = p.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    for n in range(args.runs):
        round_: dict[str, Any] = {}
        kinds = ("evd", "collector", "baseline") if args.baseline else ("evd", "collector")
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix=f"versus-{kind}-") as tmp:
                round_[kind] = run_server(args, kind, Path(tmp))
        ratio = (round_["evd"]["events_per_cpu_s"] / round_["collector"]["events_per_cpu_s"]
                 if round_["collector"]["events_per_cpu_s"] else 0.0)
        round_["ratio"] = round(ratio, 3)
        rounds.append(round_)
        evd, col = round_["evd"], round_["collector"]
        print(f"run {n + 1}: evd {evd['events_per_cpu_s']:,} events per CPU-second"
              f" ({evd['accepted']:,} events, {evd['cpu_s']:.2f} CPU-s, drained"
              f" {'yes' if evd['drained'] else 'NO'} after {evd['done_s']:.1f} s);"
              f" collector {col['events_per_cpu_s']:,} ({col['accepted']:,} events,"
              f" {col['cpu_s']:.2f} CPU-s); ratio {ratio:.2f}x", flush=True)
        if args.baseline:
            base = round_["baseline"]
            round_["vs_baseline"] = round(
                evd["events_per_cpu_s"] / base["events_per_cpu_s"] if base["events_per_cpu_s"]
                else 0.0, 3)
            print(f"       baseline {base['events_per_cpu_s']:,} events per CPU-second"
                  f" ({base['accepted']:,} events, {base['cpu_s']:.2f} CPU-s, drained"
                  f" {'yes' if base['drained'] else 'NO'}); evd / baseline"
                  f" {round_['vs_baseline']:.2f}x", flush=True)
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"batch {args.batch}: evd / collector per CPU-second, median of {len(rounds)}:"
          f" {median:.2f}x")
    if args.baseline:
        print(f"batch {args.batch}: evd / baseline per CPU-second, median of {len(rounds)}:"
              f" {statistics.median(r['vs_baseline'] for r in rounds):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "versus.json").write_text(json.dumps(
        {"batch": args.batch, "duration_s": args.duration, "connections": args.connections,
         "rounds": rounds, "median_ratio": median}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
