"""Processing throughput on one core: evd's PartitionProcessor against bytewax 0.21.

One run records N listening events as raw-log records in memory (as the edge
writes them), then times, on the same events:

- **evd**: what ``evd.state.runner`` does, step by step: per fetch (up to its
  ``FETCH_BYTES`` of one partition's records), ``records.decode`` and
  ``PartitionProcessor.process`` each record, one ``tick``, the outputs encoded
  as tagged records; at the end the partitions go idle and closing ticks flush
  every session and chart window. One processor per partition (all partitions,
  all events), fetches in log order, the wall clock simulated by the records'
  arrival times. Events/s and the split between decode, process, tick, encode.
- **bytewax**: the same sessionization as a bytewax 0.21 dataflow
  (``bench/bytewax_sessions.py``), one worker, ``run_main``, fed lists of
  ``--bytewax-batch`` events already decoded into evd's ``Event`` structs
  (decoding is not timed for bytewax; it is for evd).

Each engine runs in a forked child (fresh heap, the recorded input shared), one
after the other, ``--repeat`` times, interleaved. ``--cpu K`` pins everything to
CPU K. Prints a table and writes ``processing.json`` to ``--out``.

    python -m bench.processing --events 1000000 --cpu 0 --out bench-out/processing
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import heapq
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import orjson

from evd.bench.traffic import TrafficConfig, TrafficModel
from evd.core.config import ProcessingConfig
from evd.core.log import partitions_for, records
from evd.core.log.records import Kind
from evd.core.schema import (
    Event,
    RawBatch,
    Session,
    batch_is_valid,
    envelope_decoder,
    epoch_ms,
    msgpack_encoder,
)

#: Event time of the first batch: 2024-06-03T00:00:00Z (fixed, so runs repeat).
START_MS = 1_717_372_800_000
#: Chart window of evd's default config (charts.window_s = 60).
CHART_WINDOW_MS = 60_000
#: The edge's log partitions by default.
PARTITIONS = 8
#: Delivery delay of a request (client -> edge): log-normal, median and cap.
#: The cap plus the traffic model's own re-timing (up to 2 s) keeps every event
#: within evd's 5 s out-of-orderness bound, so nothing is late by construction.
DELAY_MEDIAN_MS = 60
DELAY_CAP_MS = 2_500
#: The sub-log every record is read from (one edge writer per partition).
SOURCE = 0
_FRAME = struct.Struct("<IB")
#: The note when evd's and bytewax's sessions agree.
SAME_SESSIONS = ("both engines produced the same sessions, field by field"
                 " (digest of every session, plays included)")


# ---------------------------------------------------------------- the input
@dataclass
class Recorded:
    """Raw-log records in log order, as ``(partition, tagged RAW record)``."""

    records: list[tuple[int, bytes]]
    events: int
    requests: int
    partitions: int
    stats: dict[str, Any] = field(default_factory=dict)


def record(events: int, *, seed: int = 1, users: int = 20_000, rate: float = 100.0,
           batch: int = 100, partitions: int = PARTITIONS) -> Recorded:
    """Generate ``events`` events and record them as the edge would.

    The traffic model (``evd.bench.traffic``) with no duplicates, invalid or late
    events (the edge drops the first two; late uploads would only be late in
    both engines) sends ``batch``-event requests at ``rate`` events/s of event
    time; each request reaches the edge after a random delivery delay, so
    requests are appended in arrival order and event times are in order up to a
    few seconds. A request is split by ``partition_for(user_id, partitions)``
    into one RAW record per partition, stamped with its arrival time.
    """
    cfg = TrafficConfig(seed=seed, users=users, duplicate_rate=0.0, invalid_rate=0.0,
                        late_rate=0.0)
    model = TrafficModel(cfg, START_MS, rate_hint=rate)
    rng = random.Random(seed * 7919 + 17)
    mu = math.log(DELAY_MEDIAN_MS)
    out: list[tuple[int, bytes]] = []
    in_flight: list[tuple[int, int, bytes]] = []
    newest = [-1] * partitions
    disorder_max = 0
    beyond_bound = 0
    # Events in the same millisecond as their user's previous one: evd orders such
    # ties by event_id, bytewax by arrival, so their sessions may differ.
    last_of_user: dict[str, int] = {}
    ties = 0
    bound = ProcessingConfig().max_out_of_orderness_ms

    def arrive(received_at: int, body: bytes) -> None:
        nonlocal disorder_max, beyond_bound, ties
        evs = envelope_decoder.decode(body).events
        if not batch_is_valid(evs):
            raise AssertionError("the traffic model produced an invalid event")
        groups: dict[int, list[Event]] = {}
        for ev, p in zip(evs, partitions_for([ev.user_id for ev in evs], partitions), strict=True):
            groups.setdefault(p, []).append(ev)
        for p, group in groups.items():
            for ev in group:
                t = epoch_ms(ev.timestamp)
                if last_of_user.get(ev.user_id) == t:
                    ties += 1
                last_of_user[ev.user_id] = t
                if t > newest[p]:
                    newest[p] = t
                elif newest[p] - t > disorder_max:
                    disorder_max = newest[p] - t
                    if disorder_max > bound:
                        beyond_bound += 1
            out.append((p, records.encode(Kind.RAW, received_at,
                                          RawBatch(received_at, group))))

    requests = math.ceil(events / batch)
    left = events
    for j in range(requests):
        n = min(batch, left)
        left -= n
        t = START_MS + int(j * batch * 1000 / rate)
        body = orjson.dumps({"events": model.batch(n, t)})
        delay = min(DELAY_CAP_MS, int(rng.lognormvariate(mu, 1.0)))
        heapq.heappush(in_flight, (t + delay, j, body))
        # Every later request is sent after t, so what arrived by t is final.
        while in_flight and in_flight[0][0] <= t:
            received_at, _, body = heapq.heappop(in_flight)
            arrive(received_at, body)
    while in_flight:
        received_at, _, body = heapq.heappop(in_flight)
        arrive(received_at, body)
    stats = {
        "event_time_span_s": round((max(newest) - START_MS) / 1000, 1),
        "max_disorder_ms": disorder_max,
        "events_beyond_bound": beyond_bound,
        "user_time_ties": ties,
        "sessions_started_by_model": model.stats["sessions"],
        "by_type": model.stats["by_type"],
        "model_pace": model.stats["pace"],
        "model_compressed": model.stats["compressed"],
        "model_stretched": model.stats["stretched"],
    }
    return Recorded(out, events, requests, partitions, stats)


def write_records(path: Path, recorded: Recorded) -> None:
    """The records as frames: u32 length, u8 partition, payload (little endian)."""
    with open(path, "wb") as f:
        for p, payload in recorded.records:
            f.write(_FRAME.pack(len(payload), p))
            f.write(payload)


def decoded_batches(recorded: Recorded, size: int) -> list[list[Event]]:
    """Every event of the records, in log order, decoded, in lists of ``size``."""
    flat: list[Event] = []
    for _, payload in recorded.records:
        flat.extend(records.decode(payload, "raw").events)
    return [flat[i:i + size] for i in range(0, len(flat), size)]


# ---------------------------------------------------------------------- evd
def _summary(sessions: Sequence[Session]) -> dict[str, Any]:
    ordered = sorted(sessions, key=lambda s: s.session_id)
    return {
        "sessions": len(sessions),
        "event_count": sum(s.event_count for s in sessions),
        "play_count": sum(s.play_count for s in sessions),
        "stream_count": sum(s.stream_count for s in sessions),
        "listened_ms": sum(s.listened_ms for s in sessions),
        "users": len({s.user_id for s in sessions}),
        # Every field of every session, plays included, in session-id order.
        "digest": hashlib.sha256(msgpack_encoder.encode(ordered)).hexdigest()[:16],
    }


@dataclass
class Fetch:
    """What one runner step of ``partition`` takes: records, and the wall clock then."""

    partition: int
    payloads: list[bytes]
    #: The simulated wall clock of the step: arrival of its last record.
    now: int
    #: Whether the partition has records after these (its sub-log is in the backlog).
    more: bool


def plan_fetches(recorded: Recorded, fetch_bytes: int) -> list[Fetch]:
    """The records cut as the runner's fetches cut them (up to ``fetch_bytes`` of one
    partition each), in the order their last records were appended."""
    per: dict[int, list[tuple[int, bytes]]] = {}
    for i, (p, payload) in enumerate(recorded.records):
        per.setdefault(p, []).append((i, payload))
    keyed: list[tuple[int, Fetch]] = []
    for p, recs in per.items():
        start = 0
        while start < len(recs):
            end, size = start, 0
            while end < len(recs) and (end == start or size + len(recs[end][1]) <= fetch_bytes):
                size += len(recs[end][1])
                end += 1
            last_index, last = recs[end - 1]
            now = records.header_of(last, "raw").timestamp
            assert now is not None
            keyed.append((last_index, Fetch(p, [r for _, r in recs[start:end]], now,
                                            end < len(recs))))
            start = end
    keyed.sort(key=lambda k: k[0])
    return [f for _, f in keyed]


def run_evd(recorded: Recorded, profile: Path | None = None) -> dict[str, Any]:
    """Time what ``evd.state.runner`` does, step by step, over every record: per fetch,
    decode and process each record, tick once, encode the outputs as records; then the
    partitions go idle and the closing ticks flush every session and window."""
    from evd.state.processor import Outputs, PartitionProcessor
    from evd.state.runner import FETCH_BYTES, output_records

    cfg = ProcessingConfig()
    plan = plan_fetches(recorded, FETCH_BYTES)
    first = records.header_of(recorded.records[0][1], "raw").timestamp or 0
    procs = [PartitionProcessor(p, cfg, CHART_WINDOW_MS, now_ms=first)
             for p in range(recorded.partitions)]
    closed_until: list[int | None] = [None] * recorded.partitions
    out = Outputs()
    decode = records.decode_raw
    clock = time.perf_counter_ns
    sessions: list[Session] = []
    late_events = 0
    emitted = {"records": 0, "bytes": 0, "events": 0}
    backlog_of = {True: frozenset((SOURCE,)), False: frozenset()}

    forward: dict[int, msgspec.Raw] = {}

    def produce(p: int, now: int) -> None:
        # The runner's own encoding of a pass's outputs (output_records).
        nonlocal late_events
        appends, closed_until[p] = output_records(p, out, now, forward, closed_until[p])
        sessions.extend(out.sessions)
        emitted["events"] += sum(len(b.events) for b in out.events)
        late_events += sum(len(b.events) for b in out.late)
        emitted["records"] += len(appends)
        emitted["bytes"] += sum(len(payload) for _, _, payload in appends)
        out.clear()
        forward.clear()

    def loop() -> tuple[int, int, int, int, int]:
        t_decode = t_process = t_tick = t_encode = 0
        now = first
        for fetch in plan:
            p = fetch.partition
            proc = procs[p]
            now = fetch.now
            for payload in fetch.payloads:
                t0 = clock()
                raw, raw_events = decode(payload)
                t1 = clock()
                before = len(out.events)
                proc.process(SOURCE, raw, now, out, release=False)  # as the runner does
                if len(out.events) > before and len(out.events[-1].events) == len(raw.events):
                    forward[before] = raw_events
                t_decode += t1 - t0
                t_process += clock() - t1
            t0 = clock()
            proc.tick(now, backlog_of[fetch.more], out)
            t1 = clock()
            produce(p, now)
            t_tick += t1 - t0
            t_encode += clock() - t1
        # The end of the input: the partitions go idle and the wall clock moves
        # on until every session and window has closed.
        t0 = clock()
        final = now + cfg.session_gap_ms + cfg.max_out_of_orderness_ms \
            + cfg.idle_timeout_ms + CHART_WINDOW_MS
        t_final_encode = 0
        for step in (now + cfg.idle_timeout_ms + 1, final):
            for p, proc in enumerate(procs):
                proc.tick(step, backlog_of[False], out)
                e0 = clock()
                produce(p, step)
                t_final_encode += clock() - e0
        t_final = clock() - t0 - t_final_encode
        return t_decode, t_process, t_tick + t_final, t_encode + t_final_encode, t_final

    gc.collect()
    gc.freeze()
    prof = cProfile.Profile() if profile is not None else None
    c0 = time.process_time()
    w0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    t_decode, t_process, t_tick, t_encode, t_final = loop()
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - w0
    cpu = time.process_time() - c0
    gc.unfreeze()
    phases = {"decode": t_decode / 1e9, "process": t_process / 1e9, "tick": t_tick / 1e9,
              "encode": t_encode / 1e9}
    timed = sum(phases.values())
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "events_per_s": recorded.events / seconds,
        "events_per_cpu_s": recorded.events / cpu if cpu else None,
        "fetches": len(plan),
        "fetch_bytes": FETCH_BYTES,
        "phases_s": phases,
        "phase_shares": {k: round(v / timed, 4) for k, v in phases.items()} if timed else {},
        "final_ticks_s": t_final / 1e9,
        "late_events": late_events,
        "emitted": emitted,
        "summary": _summary(sessions),
    }
    if prof is not None and profile is not None:
        prof.dump_stats(str(profile))
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        result["profile_top"] = text.getvalue()
    return result


# ------------------------------------------------------------------ bytewax
def bytewax_version() -> str | None:
    """The installed bytewax version, or None."""
    try:
        return metadata.version("bytewax")
    except metadata.PackageNotFoundError:
        return None


def run_bytewax(recorded: Recorded, batch: int, feed: str) -> dict[str, Any]:
    """Time the bytewax dataflow over the same events, handed over decoded."""
    from bench import bytewax_sessions

    cfg = ProcessingConfig()
    batches = decoded_batches(recorded, batch)
    gc.collect()
    gc.freeze()
    run = bytewax_sessions.run(batches, gap_ms=cfg.session_gap_ms,
                               out_of_orderness_ms=cfg.max_out_of_orderness_ms, feed=feed)
    gc.unfreeze()
    return {
        "seconds": run.seconds,
        "cpu_seconds": run.cpu_seconds,
        "events_per_s": run.events / run.seconds,
        "events_per_cpu_s": run.events / run.cpu_seconds if run.cpu_seconds else None,
        "late_events": run.late,
        "feed": feed,
        "batch": batch,
        "summary": _summary(run.sessions),
    }


# ------------------------------------------------------------------ driving
def in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` in a forked child (fresh heap, the input shared) and return its result."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(rfd)
            try:
                measured = fn()
            except BaseException:
                traceback.print_exc()
                raise
            with os.fdopen(wfd, "wb") as w:
                w.write(json.dumps(measured).encode())
            code = 0
        finally:
            # Never return into the parent's code (pytest, the rest of main).
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"the run failed (exit status {os.waitstatus_to_exitcode(status)});"
                         " its traceback is on stderr"}
    result: dict[str, Any] = json.loads(data)
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    ok.sort(key=lambda r: r["events_per_s"])
    return ok[(len(ok) - 1) // 2]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _git_dirty() -> list[str] | None:
    """Files under evd/ that differ from the commit (the code measured is not it)."""
    try:
        lines = subprocess.run(["git", "status", "--porcelain", "--", "evd"],
                               capture_output=True, text=True, check=True,
                               cwd=Path(__file__).parent).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in lines]


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table(report: dict[str, Any]) -> str:
    """The printed summary of a report."""
    lines = []
    inp = report["input"]
    lines.append(
        f"input: {inp['events']:,} events, {inp['records']:,} raw records "
        f"({inp['events_per_record']:.1f} events each, {inp['partitions']} partitions), "
        f"{inp['event_time_span_s'] / 3600:.2f} h of event time, "
        f"max disorder {inp['max_disorder_ms']} ms; recorded in {inp['record_seconds']:.1f} s")
    head = f"{'engine':<10} {'events/s':>12} {'per CPU-s':>12} {'seconds':>8} " \
           f"{'sessions':>9} {'in sessions':>12} {'late':>6} runs"
    lines.append(head)
    lines.append("-" * len(head))
    for name in ("evd", "bytewax"):
        eng = report.get(name)
        if eng is None:
            continue
        if "error" in eng:
            lines.append(f"{name:<10} failed: {eng['error'].strip().splitlines()[-1]}")
            continue
        if "skipped" in eng:
            lines.append(f"{name:<10} skipped: {eng['skipped']}")
            continue
        runs = ", ".join(f"{r['events_per_s']:,.0f}" for r in eng["runs"] if "error" not in r)
        s = eng["summary"]
        lines.append(
            f"{name:<10} {_rate(eng['events_per_s']):>12} {_rate(eng['events_per_cpu_s']):>12} "
            f"{eng['seconds']:>8.2f} {s['sessions']:>9,} {s['event_count']:>12,} "
            f"{eng['late_events']:>6,} [{runs}]")
    if report.get("ratio") is not None:
        lines.append(f"evd / bytewax: {report['ratio']:.2f}x events/s "
                     f"({report['cpu_ratio']:.2f}x per CPU-second)")
    evd = report.get("evd")
    if evd and "phase_shares" in evd:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in evd["phase_shares"].items())
        lines.append(f"evd time: {shares} (final ticks {evd['final_ticks_s'] * 1000:.0f} ms)")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def compare(report: dict[str, Any]) -> list[str]:
    """Notes on where the engines' sessions differ."""
    evd = report.get("evd") or {}
    bw = report.get("bytewax") or {}
    if "summary" not in evd or "summary" not in bw:
        return []
    notes = []
    a, b = evd["summary"], bw["summary"]
    for key in ("sessions", "event_count", "play_count", "stream_count", "listened_ms",
                "digest"):
        if a[key] != b[key]:
            if key == "digest":
                notes.append("the sessions' fields differ (digest of every session)")
                continue
            rel = (b[key] - a[key]) / a[key] if a[key] else float("inf")
            notes.append(f"{key} differs: evd {a[key]:,}, bytewax {b[key]:,} ({rel:+.3%})")
    if not notes:
        notes.append(SAME_SESSIONS)
    else:
        ties = report.get("input", {}).get("user_time_ties")
        if ties:
            notes.append(
                f"{ties:,} events fall in the same millisecond as their user's previous"
                " event: evd orders such ties by event_id, bytewax by arrival (a model"
                " compressing time, --users too small for --rate, makes them)")
    return notes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.processing",
        description="evd's processor against bytewax 0.21 on the same events, one core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="events to generate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=20_000, help="user population")
    p.add_argument("--rate", type=float, default=100.0,
                   help="events per second of event time (100: 20,000 users at real pace)")
    p.add_argument("--request-batch", type=int, default=100, help="events per request")
    p.add_argument("--partitions", type=int, default=PARTITIONS)
    p.add_argument("--bytewax-batch", type=int, default=1000,
                   help="events per list handed to bytewax's source")
    p.add_argument("--bytewax-feed", choices=("flat_map", "batch_size"), default="flat_map",
                   help="lists through flat_map, or TestingSource(batch_size=...)")
    p.add_argument("--engines", default="evd,bytewax", help="comma-separated: evd, bytewax")
    p.add_argument("--repeat", type=int, default=3, help="runs per engine (the median is kept)")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--in-process", action="store_true",
                   help="run the engines in this process instead of a forked child each")
    p.add_argument("--profile", action="store_true",
                   help="an extra evd run under cProfile: evd.prof and the top 25 in the JSON")
    p.add_argument("--save-records", action="store_true",
                   help="write the recorded raw log to OUT/raw.records")
    p.add_argument("--out", type=Path, default=Path("bench-out/processing"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - {"evd", "bytewax"}
    if unknown or args.events < 1 or args.repeat < 1:
        print(f"bad options: engines {sorted(unknown)}, events {args.events}, "
              f"repeat {args.repeat}", file=sys.stderr)
        return 2
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    recorded = record(args.events, seed=args.seed, users=args.users, rate=args.rate,
                      batch=args.request_batch, partitions=args.partitions)
    record_seconds = time.perf_counter() - t0
    if args.save_records:
        write_records(args.out / "raw.records", recorded)
    gc.collect()
    report: dict[str, Any] = {
        "config": {
            "events": args.events, "seed": args.seed, "users": args.users,
            "rate": args.rate, "request_batch": args.request_batch,
            "partitions": args.partitions, "bytewax_batch": args.bytewax_batch,
            "bytewax_feed": args.bytewax_feed, "repeat": args.repeat, "cpu": args.cpu,
            "isolation": "in-process" if args.in_process else "fork per run",
            "affinity": sorted(os.sched_getaffinity(0)),
            "python": platform.python_version(), "machine": platform.machine(),
            "evd_commit": _git_commit(), "evd_uncommitted": _git_dirty(),
            "bytewax": bytewax_version(),
        },
        "input": {
            "events": recorded.events, "requests": recorded.requests,
            "records": len(recorded.records), "partitions": recorded.partitions,
            "events_per_record": recorded.events / len(recorded.records),
            "bytes": sum(len(r) for _, r in recorded.records),
            "record_seconds": record_seconds, **recorded.stats,
        },
    }
    run_one: Callable[[Callable[[], dict[str, Any]]], dict[str, Any]] = (
        (lambda fn: fn()) if args.in_process else in_child)
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    if "evd" in engines:
        jobs["evd"] = lambda: run_evd(recorded)
    if "bytewax" in engines:
        if bytewax_version() is None:
            report["bytewax"] = {"skipped": "bytewax is not installed (pip install -e '.[bench]')"}
        else:
            jobs["bytewax"] = lambda: run_bytewax(recorded, args.bytewax_batch,
                                                  args.bytewax_feed)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for i in range(args.repeat):
        for name, job in jobs.items():
            print(f"run {i + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
            runs[name].append(run_one(job))
    for name, rs in runs.items():
        report[name] = {**_median_run(rs), "runs": rs}
        if len(rs) > 1 and all("error" not in r for r in rs):
            rates = [r["events_per_s"] for r in rs]
            report[name]["spread"] = (max(rates) - min(rates)) / statistics.median(rates)
    if args.profile and "evd" in jobs:
        prof = run_one(lambda: run_evd(recorded, profile=args.out / "evd.prof"))
        report["evd_profile"] = {"events_per_s": prof.get("events_per_s"),
                                 "top": prof.get("profile_top", prof.get("error"))}
    evd, bw = report.get("evd", {}), report.get("bytewax", {})
    if "events_per_s" in evd and "events_per_s" in bw:
        report["ratio"] = evd["events_per_s"] / bw["events_per_s"]
        report["cpu_ratio"] = evd["events_per_cpu_s"] / bw["events_per_cpu_s"]
    report["notes"] = compare(report)
    (args.out / "processing.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    if "evd_profile" in report:
        print(report["evd_profile"]["top"])
    print(f"written: {args.out / 'processing.json'}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    return 1 if failed else 0


def iter_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """The frames of a file written by ``--save-records``."""
    with open(path, "rb") as f:
        while head := f.read(_FRAME.size):
            size, p = _FRAME.unpack(head)
            yield p, f.read(size)


if __name__ == "__main__":
    sys.exit(main())
