"""``evd bench``: drive load at an evd server and write a JSON + HTML report.

    evd bench [--target URL] [--rate R|max] [--duration S] [--batch N] [--out DIR] ...
    evd bench generate --out FILE [--events N] ...   write a traffic stream (NDJSON)
    evd bench render DIR                             re-render report.html from report.json

The harness spawns ``--procs`` generator processes (``evd.bench.driver``), gives them
one common start time, scrapes the server's ``/metrics`` while they run, merges
their histograms and writes ``report.json`` and ``report.html`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec
import uvloop

from evd.bench import html, metrics
from evd.bench.driver import child_main
from evd.bench.http import BenchHttpError, Target, fetch
from evd.bench.plan import RunPlan, Spike
from evd.bench.report import ServerScrapes, build_report, decode, encode, summary_text
from evd.bench.traffic import TrafficConfig, format_ts, parse_ts, write_stream
from evd.core.errors import EvdError

log = logging.getLogger("evd.bench")

DEFAULT_TARGET = "http://127.0.0.1:8080"
DEFAULT_KEY = "evd-dev-key"
# Above this many events in a run, bodies are generated during the run instead of
# before it (about 450 bytes an event held in memory).
PREGEN_MAX_EVENTS = 3_000_000
# Generator processes must be ready within this long (warm start + pre-generation).
SETUP_TIMEOUT_S = 300.0
# Extra time the harness waits for results past duration + request timeout.
RESULT_GRACE_S = 30.0
# Seconds a generator needs per pre-generated event, to plan the common start.
GEN_COST_S = 20e-6


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _rate(text: str) -> float | None:
    if text.lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of events/s or 'max', got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError("--rate must be > 0 (or 'max')")
    return value


def _positive(kind: type[int | float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {kind.__name__}, got {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _add_traffic_args(p: argparse.ArgumentParser) -> None:
    d = TrafficConfig()
    g = p.add_argument_group("traffic model")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    g.add_argument("--users", type=_positive(int), default=d.users,
                   help="user population (default %(default)s)")
    g.add_argument("--tracks", type=_positive(int), default=d.tracks,
                   help="catalog size, Zipf-popular (default %(default)s)")
    g.add_argument("--zipf", type=_positive(float), default=d.zipf_s,
                   help="Zipf exponent of track popularity (default %(default)s)")
    g.add_argument("--duplicate-rate", type=_fraction, default=d.duplicate_rate,
                   help="fraction of events that are client retries (default %(default)s)")
    g.add_argument("--invalid-rate", type=_fraction, default=d.invalid_rate,
                   help="fraction of events with one schema defect (default %(default)s)")
    g.add_argument("--late-rate", type=_fraction, default=d.late_rate,
                   help="fraction of events from offline sessions sent late (default "
                        "%(default)s)")


def _traffic(args: argparse.Namespace) -> TrafficConfig:
    return TrafficConfig(seed=args.seed, users=args.users, tracks=args.tracks,
                         zipf_s=args.zipf, duplicate_rate=args.duplicate_rate,
                         invalid_rate=args.invalid_rate, late_rate=args.late_rate)


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``evd bench`` (the load run)."""
    p = argparse.ArgumentParser(
        prog="evd bench",
        description="Load-test an evd server with realistic listening traffic and write "
                    "report.json + report.html into --out. Other commands: "
                    "'evd bench generate --help' (write a traffic stream file), "
                    "'evd bench render DIR' (re-render the HTML from report.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default=DEFAULT_TARGET, help="server base URL (http only)")
    p.add_argument("--api-key", default=DEFAULT_KEY, help="bearer key for POST /v1/events")
    p.add_argument("--duration", type=_positive(float), default=30.0,
                   help="seconds of load")
    p.add_argument("--rate", type=_rate, default="max", metavar="R|max",
                   help="offered events/s, open loop (latency measured from the scheduled "
                        "send time); 'max' = closed loop, each connection sends again as soon "
                        "as answered")
    p.add_argument("--batch", type=_positive(int), default=100, help="events per request")
    p.add_argument("--out", default="./bench-out", help="directory for report.json/html")
    p.add_argument("--procs", type=_positive(int), default=min(2, _cpus()),
                   help="generator processes")
    p.add_argument("--connections", type=_positive(int), default=32,
                   help="keep-alive connections in total (split over --procs); bounds "
                        "requests in flight")
    p.add_argument("--gzip", action="store_true", help="send bodies with Content-Encoding: gzip")
    p.add_argument("--timeout", type=_positive(float), default=10.0,
                   help="seconds to wait for a response")
    p.add_argument("--interval", type=_positive(float), default=1.0,
                   help="seconds per point of the time series")
    p.add_argument("--spike-at", type=float, default=None, metavar="S",
                   help="start an album-drop spike S seconds into the run (needs a numeric "
                        "--rate)")
    p.add_argument("--spike-duration", type=_positive(float), default=5.0,
                   help="spike length in seconds")
    p.add_argument("--spike-factor", type=_positive(float), default=8.0,
                   help="rate multiplier during the spike (5-10 models a thundering herd)")
    p.add_argument("--spike-hot-share", type=_fraction, default=0.3,
                   help="share of plays that go to the new album during the spike")
    p.add_argument("--replay", default=None, metavar="FILE",
                   help="send events from a stream file (from 'evd bench generate') instead "
                        "of generating them")
    p.add_argument("--rebase", action="store_true",
                   help="with --replay: shift event timestamps so the stream starts now")
    p.add_argument("--pregenerate", choices=("auto", "on", "off"), default="auto",
                   help="build all request bodies before the run (open loop) so generating "
                        "does not compete with sending; auto = when the run has at most "
                        f"{PREGEN_MAX_EVENTS:,} events")
    p.add_argument("--wait-ready", type=float, default=10.0,
                   help="seconds to wait for the target's /readyz before giving up")
    p.add_argument("--title", default="", help="title of the HTML report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_traffic_args(p)
    return p


def generate_parser() -> argparse.ArgumentParser:
    """The parser of ``evd bench generate``."""
    p = argparse.ArgumentParser(
        prog="evd bench generate",
        description="Write a deterministic traffic stream (one JSON event per line; gzip if "
                    "FILE ends in .gz) for 'evd bench --replay FILE'. Same options, same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="stream file to write")
    p.add_argument("--events", type=_positive(int), default=100_000, help="events to write")
    p.add_argument("--rate", type=_positive(float), default=1000.0,
                   help="events/s the timestamps are spaced for")
    p.add_argument("--batch", type=_positive(int), default=100,
                   help="events generated per client send")
    p.add_argument("--start", default="2024-06-01T12:00:00Z",
                   help="RFC 3339 time of the first event")
    _add_traffic_args(p)
    return p


def build_plan(args: argparse.Namespace) -> RunPlan:
    """Validate run arguments into a plan; raises ``ValueError`` naming the bad option."""
    Target.parse(args.target)
    spike = None
    if args.spike_at is not None:
        if args.rate is None:
            raise ValueError("--spike-at needs a numeric --rate (a spike of 'max' is still max)")
        if args.spike_at < args.interval:
            raise ValueError("--spike-at must leave at least one --interval of baseline before it")
        if args.spike_at + args.spike_duration >= args.duration:
            raise ValueError("the spike must end before --duration, to measure recovery")
        if args.spike_factor <= 1:
            raise ValueError("--spike-factor must be > 1")
        spike = Spike(at_s=args.spike_at, duration_s=args.spike_duration,
                      factor=args.spike_factor, hot_share=args.spike_hot_share)
    if args.replay is not None and not Path(args.replay).is_file():
        raise ValueError(f"--replay file not found: {args.replay}")
    if args.rebase and args.replay is None:
        raise ValueError("--rebase only applies with --replay")
    per_proc = max(1, math.ceil(args.connections / args.procs))
    plan = RunPlan(
        target=args.target, api_key=args.api_key, duration_s=args.duration, rate=args.rate,
        batch=args.batch, procs=args.procs, connections=per_proc, gzip=args.gzip,
        timeout_s=args.timeout, interval_s=args.interval, traffic=_traffic(args), spike=spike,
        replay=args.replay, rebase=args.rebase)
    pregen = args.pregenerate == "on" or (
        args.pregenerate == "auto" and plan.rate is not None
        and plan.events_until(plan.duration_s) <= PREGEN_MAX_EVENTS)
    if pregen and plan.rate is None:
        raise ValueError("--pregenerate on needs a numeric --rate (closed loop has no schedule)")
    return msgspec.structs.replace(plan, pregenerate=pregen)


class Progress:
    """A one-line progress bar on a terminal, or a line every few seconds elsewhere."""

    def __init__(self, stream: TextIO, duration: float, enabled: bool) -> None:
        self.stream = stream
        self.duration = duration
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last_line = -math.inf
        self._every = max(1.0, duration / 5)

    def update(self, elapsed: float, totals: dict[str, int]) -> None:
        """Show progress at ``elapsed`` seconds with summed process counters."""
        if not self.enabled or elapsed < 0:
            return
        frac = min(1.0, max(0.0, elapsed / self.duration))
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        text = (f"[{bar}] {min(elapsed, self.duration):5.1f}/{self.duration:g}s  "
                f"sent {totals.get('events_sent', 0):,} ev  ok {totals.get('ok', 0):,}  "
                f"429/503 {totals.get('shed', 0):,}  err {totals.get('errors', 0):,}  "
                f"p99 {totals.get('p99_us', 0) / 1000:.1f} ms")
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.stream.flush()
        elif elapsed - self._last_line >= self._every:
            self._last_line = elapsed
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        """End the progress line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def wait_ready(target: Target, timeout: float) -> str | None:
    """Poll ``GET /readyz`` until 200; return None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        try:
            resp = await fetch(target, "/readyz", timeout=2.0)
            if resp.status == 200:
                return None
            last = f"/readyz answered {resp.status}"
        except BenchHttpError as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            return last
        await asyncio.sleep(0.1)


async def _scrape(target: Target) -> tuple[metrics.Samples | None, str | None]:
    try:
        resp = await fetch(target, "/metrics", timeout=5.0)
    except BenchHttpError as exc:
        return None, f"GET /metrics failed: {exc}"
    if resp.status != 200:
        return None, f"GET /metrics answered {resp.status}"
    try:
        return metrics.parse(resp.body.decode("utf-8", "replace")), None
    except metrics.MetricsError as exc:
        return None, str(exc)


class RunFailed(EvdError):
    """A generator process failed or the run could not start."""


async def orchestrate(plan: RunPlan, progress: Progress
                      ) -> tuple[list[dict[str, Any]], ServerScrapes]:
    """Run the generator processes and scrape metrics; return their results."""
    target = Target.parse(plan.target)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    per_proc_events = (plan.events_until(plan.duration_s) / plan.procs
                       if plan.rate is not None else 0.0)
    estimate = 1.0 + (per_proc_events * GEN_COST_S if plan.pregenerate else 0.0)
    start = ctx.Value("d", time.time() + estimate)
    plan_bytes = msgspec.msgpack.encode(plan)
    procs = [ctx.Process(target=child_main, args=(plan_bytes, i, queue, go, start),
                         name=f"evd-bench-{i}", daemon=True) for i in range(plan.procs)]
    scrapes = ServerScrapes()
    scrapes.before, scrapes.error = await _scrape(target)
    metrics_ok = scrapes.before is not None
    for proc in procs:
        proc.start()
    results: dict[int, dict[str, Any]] = {}
    progress_by_proc: dict[int, dict[str, int]] = {}
    ready: set[int] = set()
    try:
        setup_deadline = time.monotonic() + SETUP_TIMEOUT_S + estimate
        while len(ready) < plan.procs:
            _drain(queue, ready, results, progress_by_proc)
            _check_alive(procs, ready, results)
            if time.monotonic() > setup_deadline:
                raise RunFailed(f"generator processes not ready after {SETUP_TIMEOUT_S:g}s")
            await asyncio.sleep(0.02)
        start_epoch = max(start.value, time.time() + 0.3)
        start.value = start_epoch
        go.set()
        end_deadline = time.monotonic() + (start_epoch - time.time()) + plan.duration_s \
            + plan.timeout_s + RESULT_GRACE_S
        next_scrape = start_epoch + plan.interval_s
        while len(results) < plan.procs:
            _drain(queue, ready, results, progress_by_proc)
            _check_alive(procs, ready, results)
            now = time.time()
            if metrics_ok and now >= next_scrape and now <= start_epoch + plan.duration_s + 0.5:
                next_scrape += plan.interval_s
                samples, err = await _scrape(target)
                if samples is None:
                    metrics_ok = False
                    scrapes.error = err
                else:
                    scrapes.during.append((now - start_epoch, samples))
            summed: dict[str, int] = {}
            for snap in progress_by_proc.values():
                for k, v in snap.items():
                    summed[k] = max(summed.get(k, 0), v) if k == "p99_us" else \
                        summed.get(k, 0) + v
            progress.update(now - start_epoch, summed)
            if time.monotonic() > end_deadline:
                raise RunFailed("generator processes did not report results in time")
            await asyncio.sleep(0.05)
        progress.done()
        if metrics_ok:
            # A moment for the server to count what it acknowledged last.
            await asyncio.sleep(0.3)
        scrapes.after, err = await _scrape(target)
        if err:
            scrapes.error = err
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        queue.close()
    return [results[i] for i in sorted(results)], scrapes


def _drain(queue: Any, ready: set[int], results: dict[int, dict[str, Any]],
           progress: dict[int, dict[str, int]]) -> None:
    while True:
        try:
            kind, proc, payload = queue.get_nowait()
        except queue_mod.Empty:
            return
        if kind == "ready":
            ready.add(proc)
        elif kind == "progress":
            progress[proc] = payload
        elif kind == "result":
            results[proc] = payload
            ready.add(proc)
        elif kind == "error":
            raise RunFailed(f"generator process {proc} failed:\n{payload}")


def _check_alive(procs: Sequence[Any], ready: set[int],
                 results: dict[int, dict[str, Any]]) -> None:
    for i, proc in enumerate(procs):
        if proc.exitcode not in (None, 0) and i not in results:
            raise RunFailed(f"generator process {i} exited with code {proc.exitcode}")


def _run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    try:
        plan = build_plan(args)
    except ValueError as exc:
        print(f"evd bench: {exc}", file=sys.stderr)
        return 2
    target = Target.parse(plan.target)
    why = uvloop.run(wait_ready(target, args.wait_ready))
    if why is not None:
        print(f"evd bench: target {plan.target} is not ready: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started_at = format_ts(int(time.time() * 1000))
    progress = Progress(sys.stderr, plan.duration_s, not args.no_progress)
    try:
        results, scrapes = uvloop.run(orchestrate(plan, progress))
    except RunFailed as exc:
        progress.done()
        print(f"evd bench: {exc}", file=sys.stderr)
        return 1
    report = build_report(plan, results, scrapes, started_at, _cpus(),
                          platform.python_version(), args.title)
    (out / "report.json").write_bytes(encode(report))
    (out / "report.html").write_text(html.render(report), encoding="utf-8")
    print(summary_text(report))
    print(f"  report    {out / 'report.json'}  {out / 'report.html'}")
    return 0


def _generate(argv: list[str]) -> int:
    args = generate_parser().parse_args(argv)
    start_ms = parse_ts(args.start)
    if start_ms is None:
        print(f"evd bench generate: --start is not an RFC 3339 time: {args.start}",
              file=sys.stderr)
        return 2
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = write_stream(path, _traffic(args), args.events, args.rate, start_ms, args.batch)
    print(f"wrote {args.events:,} events to {path}: duplicates {stats['duplicates']:,}, "
          f"invalid {stats['invalid']:,}, late {stats['late']:,}, "
          f"types {', '.join(f'{k} {v:,}' for k, v in stats['by_type'].items())}")
    return 0


def _render(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="evd bench render",
                                description="Re-render report.html from a report.json.")
    p.add_argument("path", help="report directory or report.json")
    args = p.parse_args(argv)
    path = Path(args.path)
    src = path / "report.json" if path.is_dir() else path
    try:
        report = decode(src.read_bytes())
    except (OSError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"evd bench render: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    dest = src.with_name("report.html")
    dest.write_text(html.render(report), encoding="utf-8")
    print(summary_text(report))
    print(f"  report    {dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``evd bench``; returns the process exit code (0 ok, 1 run failed, 2 usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "generate":
        return _generate(args[1:])
    if args and args[0] == "render":
        return _render(args[1:])
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
