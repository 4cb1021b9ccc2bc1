"""The whole embedded path on one worker: HTTP -> raw log -> processor -> sinks.

Starts ``evd serve --workers 1`` (fsync ``always`` unless told otherwise; the
default config, so the default sinks run: ``lake`` (files) and ``warehouse``
(sqlite), and the audit stage) on one CPU, sends seed-shaped batches from this
process on another CPU at a paced rate (or as fast as the server answers,
``--rate max``), and samples the server's ``/metrics`` twice a second: events
accepted, processed and delivered by each sink, and each stage's lag in bytes
and seconds (the processors' and every sink's ``evd_sink_lag_seconds``).

A rate is *sustained* when every stage's lag stays bounded: at the end of the
load the processors are less than ``--lag-bound`` seconds behind and each sink
less than ``--lag-bound`` plus its ``batch.max_age_s`` (a sink holds a batch
that long by design: the lake up to 10 s), and every request got 200.
``--rates`` runs several rates in turn (a fresh server each) and reports the
highest sustained one. ``OUT/pipeline.json`` has every sample;
``OUT/pipeline.html`` draws each stage's lag over time for every rate (the
charts of ``evd bench``'s report).

Events carry the wall clock as their timestamp (stamped per request), users are
spread over 100,000 ids, so the processor builds sessions and charts as in
production rather than routing stale events to ``late``.

    python -m bench.pipeline --rates 50000,100000,150000 --duration 20 --server-cpu 0 --load-cpu 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import uvloop

from bench.scaling import tree_cpu
from bench.seedload import STAMP, ClosedLoop, Load, request_templates, seed_event
from evd.bench import metrics
from evd.bench.html import COLORS, Series, line_chart
from evd.bench.http import Target
from evd.config import Config, load_config
from evd.sinks.audit.stage import AUDIT_STAGE
from evd.stages import AUDIT_BATCH

#: Placeholder for the per-request timestamp, as long as the ISO text it becomes.
TIME_STAMP = "~" * 24
SAMPLE_S = 0.5


def templates(
    batch: int, key: str, target: Target, seed: int, one_user: bool = False
) -> list[bytes]:
    """seedload's requests with the seed's timestamp turned into a placeholder of the
    same length (so Content-Length holds), stamped at each send."""
    seed_time = str(seed_event()["timestamp"]).encode()
    assert len(seed_time) == len(TIME_STAMP), "the placeholder must keep Content-Length"
    return [
        t.replace(seed_time, TIME_STAMP.encode())
        for t in request_templates(batch, key, target, seed, one_user)
    ]


class Paced(ClosedLoop):
    """A closed-loop connection that stamps the time and waits for its turn: request
    ``i`` of the load goes out no earlier than ``start + i / rate``."""

    slot: int | None = None

    def send(self) -> None:
        load = self.load
        assert isinstance(load, PacedLoad)
        now = time.perf_counter()
        if now >= load.stop or self._transport is None or self.closed:
            self.finish()
            return
        if self.slot is None:
            self.slot = load.counter
            load.counter += 1
        due = load.t0 + self.slot * load.interval
        if due > now:
            asyncio.get_running_loop().call_later(due - now, self.send)
            return
        slot, self.slot = self.slot, None
        self.sent = now
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
        data = self.rng.choice(load.templates)
        data = data.replace(STAMP, load.run_id + b"%010d" % slot)
        self._transport.write(data.replace(TIME_STAMP.encode(), stamp.encode()))


class PacedLoad(Load):
    t0 = 0.0
    interval = 0.0


def scrape(port: int) -> metrics.Samples:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    _, _, body = data.partition(b"\r\n\r\n")
    return metrics.parse(body.decode())


def point(t: float, m: metrics.Samples) -> dict[str, Any]:
    """One sample: the counters, and each stage's lag in seconds and bytes."""
    def value(name: str) -> float:
        return metrics.total(m, name) or 0.0

    lag_bytes = {"processor": value("evd_processor_lag_bytes_sum"),
                 **metrics.by_label(m, "evd_sink_lag_bytes", "sink")}
    return {
        "t": round(t, 2),
        "accepted": value("evd_events_accepted_total"),
        "processed": value("evd_processor_events_total"),
        "delivered": metrics.by_label(m, "evd_sink_delivered_total", "sink"),
        "lag_bytes": value("evd_processor_lag_bytes_sum"),
        "lag_seconds": value("evd_processor_lag_seconds_max"),
        "stage_lag_seconds": metrics.stage_lags(m),
        "stage_lag_bytes": lag_bytes,
        "sessions": value("evd_sessions_closed_total"),
        "late": value("evd_processor_late_total"),
    }


async def sample(port: int, stop: float, out: list[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    while time.perf_counter() < stop:
        m = await loop.run_in_executor(None, scrape, port)
        out.append(point(time.perf_counter() - start, m))
        await asyncio.sleep(SAMPLE_S)


async def server_cpu(pid: int, since: float, until: float) -> float:
    """CPU seconds the server's process tree used between two perf_counter times."""
    await asyncio.sleep(max(0.0, since - time.perf_counter()))
    before = sum(tree_cpu(pid).values())
    await asyncio.sleep(max(0.0, until - time.perf_counter()))
    return sum(tree_cpu(pid).values()) - before


async def drive(args: argparse.Namespace, port: int, rate: float, pid: int) -> dict[str, Any]:
    target = Target.parse(f"http://127.0.0.1:{port}")
    one_user = getattr(args, "one_user", False)
    load = PacedLoad(templates(args.batch, "evd-dev-key", target, args.seed, one_user),
                     b"%08x" % random.getrandbits(32), args.seed, count_accepted=True)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    load.t0 = start
    load.interval = 0.0 if rate <= 0 else args.batch / rate
    load.start, load.stop = start + args.warmup, start + args.duration
    load.end = load.stop
    samples: list[dict[str, Any]] = []
    sampler = loop.create_task(sample(port, start + args.duration + args.settle, samples))
    cpu = loop.create_task(server_cpu(pid, load.start, load.stop))
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Paced(load), target.host, target.port)
        load.conns.append(conn)
    await asyncio.wait_for(
        asyncio.gather(*(c.done for c in load.conns)), args.duration + 30
    )
    for conn in load.conns:
        conn.close()
    await sampler
    window = args.duration - args.warmup
    cpu_s = await cpu
    last = samples[-1] if samples else {}
    at_end = [s for s in samples if s["t"] <= args.duration]
    end_sample = at_end[-1] if at_end else last
    return {
        "rate_target": rate,
        "accepted_per_s": round(load.accepted / window),
        "statuses": dict(load.statuses),
        "p99_ms": load.hist.percentile(99) / 1000,
        # The server's CPU (supervisor and worker, every thread) in the measured window.
        "server_cpu_cores": round(cpu_s / window, 3),
        "server_cpu_us_per_event": round(cpu_s / load.accepted * 1e6, 1) if load.accepted else None,
        "lag_seconds_at_end_of_load": end_sample.get("lag_seconds", 0),
        "lag_bytes_at_end_of_load": end_sample.get("lag_bytes", 0),
        "max_lag_seconds": max((s["lag_seconds"] for s in at_end), default=0),
        "stage_lag_seconds_at_end_of_load": end_sample.get("stage_lag_seconds", {}),
        "stage_lag_bytes_at_end_of_load": end_sample.get("stage_lag_bytes", {}),
        "stage_max_lag_seconds": {
            stage: max(s["stage_lag_seconds"].get(stage, 0.0) for s in at_end)
            for stage in end_sample.get("stage_lag_seconds", {})
        },
        "stage_lag_seconds_at_last_sample": last.get("stage_lag_seconds", {}),
        "delivered_at_end_of_load": end_sample.get("delivered", {}),
        "delivered_at_last_sample": last.get("delivered", {}),
        "processed_at_end_of_load": end_sample.get("processed", 0),
        "accepted_at_end_of_load": end_sample.get("accepted", 0),
        "late": last.get("late", 0),
        "samples": samples,
    }


def start_server(args: argparse.Namespace, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, EVD_LOG__FSYNC=args.fsync)
    log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    own = os.sched_getaffinity(0)
    config = ["--config", str(args.config)] if args.config else []
    if args.server_cpu is not None:
        os.sched_setaffinity(0, {args.server_cpu})  # inherited by the server and its worker
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "serve", "--workers", "1", "--port", str(port),
             "--data-dir", str(data_dir), *config],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    finally:
        os.sched_setaffinity(0, own)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            scrape(port)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("evd serve did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lag_bounds(cfg: Config, lag_bound: float) -> dict[str, float]:
    """The lag in seconds each stage may have at the end of the load: ``lag_bound``
    for the processors, plus its ``batch.max_age_s`` for each sink (it holds a
    batch that long by design)."""
    return {"processor": lag_bound,
            **{sink.name: lag_bound + sink.batch.max_age_s for sink in cfg.sinks},
            AUDIT_STAGE: lag_bound + AUDIT_BATCH.max_age_s}


def stages_over(lags: dict[str, float], bounds: dict[str, float]) -> dict[str, float | None]:
    """The stages whose lag is over their bound, with it; a stage the server should
    run but did not report (None) counts as unbounded."""
    return {stage: lags.get(stage) for stage, bound in bounds.items()
            if lags.get(stage, math.inf) > bound}


def run_rate(args: argparse.Namespace, rate: float, bounds: dict[str, float]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="evd-pipeline-", dir=args.data_root) as tmp:
        port = free_port()
        proc = start_server(args, Path(tmp) / "data", port)
        try:
            result = uvloop.run(drive(args, port, rate, proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
    accepted = result["accepted_at_end_of_load"]
    behind = accepted - result["processed_at_end_of_load"]
    over = stages_over(result["stage_lag_seconds_at_end_of_load"], bounds)
    result["lag_bounds"] = bounds
    result["stages_over_bound"] = over
    result["sustained"] = not over and set(result["statuses"]) == {"200"}
    result["unprocessed_at_end_of_load"] = behind
    return result


def lag_chart(result: dict[str, Any], duration: float) -> str:
    """Each stage's lag over time in one run, as ``evd bench``'s report draws it."""
    samples = result["samples"]
    stages = sorted({k for s in samples for k in s["stage_lag_seconds"]},
                    key=lambda k: (k != "processor", k))
    series: list[Series] = [
        (stage, COLORS[i % len(COLORS)],
         [(s["t"], s["stage_lag_seconds"][stage]) for s in samples
          if stage in s["stage_lag_seconds"]])
        for i, stage in enumerate(stages)
    ]
    rate = result["rate_target"]
    title = f"Lag of each stage, {'max' if rate <= 0 else f'{rate:,.0f}'} ev/s"
    return line_chart(title, series, f"seconds since the load started (it ends at {duration:g} s)",
                      "seconds behind")


def write_html(path: Path, results: list[dict[str, Any]], duration: float) -> None:
    """One lag chart per rate, in a self-contained page."""
    parts = []
    for r in results:
        verdict = "sustained" if r["sustained"] else (
            "NOT sustained: " + ", ".join(
                f"{k} {'not reported' if v is None else f'{v:g} s'}"
                for k, v in r["stages_over_bound"].items()) if r["stages_over_bound"]
            else "NOT sustained: statuses " + ", ".join(r["statuses"]))
        parts.append(f'<div class="c">{lag_chart(r, duration)}</div><p>accepted '
                     f'{r["accepted_per_s"]:,} events/s: {escape(verdict)}</p>')
    path.write_text(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>evd pipeline: lag of each stage</title><style>body{font-family:sans-serif;"
        "margin:24px}.c{border:1px solid #ddd;display:inline-block}</style></head><body>"
        "<h1>The whole path on one worker: lag of each stage</h1>" + "".join(parts)
        + "</body></html>\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="max",
                        help="comma-separated events/s to try in turn, or max")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of sampling after the load stops")
    parser.add_argument("--lag-bound", type=float, default=2.0,
                        help="seconds of lag at the end of the load that still count as bounded"
                             " (sinks: plus their batch.max_age_s)")
    parser.add_argument("--config", type=Path,
                        help="evd serve's YAML config (default: none, so the default sinks)")
    parser.add_argument("--data-root", type=Path,
                        help="where the servers' data directories go (default: the temp dir)")
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-cpu", type=int)
    parser.add_argument("--load-cpu", type=int)
    parser.add_argument("--out", type=Path, default=Path("bench-out/pipeline"))
    parser.add_argument("--server-log", type=Path, help="append the servers' logs here")
    args = parser.parse_args(argv)
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    rates = [0.0 if r == "max" else float(r) for r in args.rates.split(",")]
    bounds = lag_bounds(load_config(args.config), args.lag_bound)
    results = []
    for rate in rates:
        result = run_rate(args, rate, bounds)
        results.append(result)
        lags = ", ".join(
            f"{stage} {v:.1f}" for stage, v in result["stage_lag_seconds_at_end_of_load"].items())
        print(
            f"target {'max' if rate <= 0 else f'{rate:,.0f}'} ev/s: accepted "
            f"{result['accepted_per_s']:,} ev/s, lag at end of load (s): {lags} "
            f"(processor {result['lag_bytes_at_end_of_load'] / 1e6:.1f} MB behind), p99 "
            f"{result['p99_ms']:.1f} ms, server {result['server_cpu_cores']:.2f} cores "
            f"({result['server_cpu_us_per_event'] or 0:.1f} us per event), "
            f"{'sustained' if result['sustained'] else 'NOT sustained'}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline.json").write_text(json.dumps(results, indent=1))
    write_html(args.out / "pipeline.html", results, args.duration)
    best = max((r["accepted_per_s"] for r in results if r["sustained"]), default=0)
    print(f"highest sustained: {best:,} events/s ({args.out / 'pipeline.json'}, "
          f"{args.out / 'pipeline.html'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
