"""Each sink alone on one core: events per second of ``write`` on recorded batches.

One run records the input once: ``--events`` listening events from the traffic
model (``bench.processing.record``: many users, every event type, as the edge
writes them to the raw log), run through evd's own ``PartitionProcessor`` and
``output_records``, so the ``events``, ``sessions`` and ``charts`` records are
the bytes the delivery loop reads. Then, for each sink of ``--sinks``, in a
forked child pinned to ``--cpu`` (the sink's threads with it), it:

1. decodes the records with the sink's own ``decode`` and cuts them into
   ``Batch``es as the delivery loop does (a batch closes at ``--batch`` items
   or the sink's ``batch.max_bytes``), outside the timing;
2. times ``start()``, every ``write(batch)`` of each stream of ``--streams``
   the sink takes, ``flush()`` and ``close()``, in a fresh directory;
3. counts what landed (lines of the lake's files, rows of the Parquet files,
   rows of the SQLite tables) against what was written.

``events/s`` is the events of the traffic over the whole time (start to close,
every stream's writes): the rate of traffic the sink keeps up with. With
``--loop`` every sink also runs behind the real ``DeliveryLoop`` (an embedded
log holding the records, a real consumer and audit ledger); the ``null`` sink,
which writes nothing, gives the loop's own cost (fetch, decode, batching,
ledger and offset commits).

    python -m bench.sinks --cpu 1 --out bench-out/sinks
    python -m bench.sinks --sinks sqlite --batch 1000 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import gzip
import io
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import uvloop

from bench.processing import (
    CHART_WINDOW_MS,
    PARTITIONS,
    SOURCE,
    _git_commit,
    _git_dirty,
    in_child,
    plan_fetches,
    record,
)
from bench.scaling import cpus_busy, wait_quiet
from evd.core.config import BatchConfig, ProcessingConfig, RetryConfig
from evd.core.log import records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.streams import Stream
from evd.sinks import rows
from evd.sinks.base import Batch, Sink, SinkContext
from evd.sinks.lake.sink import FilesSinkConfig
from evd.sinks.registry import AnySinkConfig, build_sink
from evd.sinks.sqlite import SqliteSinkConfig
from evd.sinks.stdout import StdoutSinkConfig

#: Every sink this script knows, in the order it runs them.
SPECS = ("files-gzip", "files-zstd", "files-none", "parquet", "sqlite", "stdout-devnull", "null")
DEFAULT_SINKS = "files-gzip,files-zstd,parquet,sqlite,stdout-devnull"
#: The issue's targets, events/s on one core.
TARGETS = {"files-gzip": 300_000, "parquet": 300_000, "sqlite": 150_000}
#: Items per write: the delivery loop's default batch.max_events (10,000) for every
#: sink. The lake's own default is 200,000 (``--batch 200000`` to measure that).
BATCH = 10_000
STREAMS = (Stream.EVENTS, Stream.SESSIONS, Stream.CHARTS)


# ---------------------------------------------------------------- the input
@dataclass
class Recording:
    """The processor's output records, per stream, as (partition, payload) in
    the order they were appended."""

    streams: dict[str, list[tuple[int, bytes]]]
    events: int
    stats: dict[str, Any] = field(default_factory=dict)


def record_outputs(events: int, *, seed: int = 1, users: int = 20_000,
                   rate: float = 100.0) -> Recording:
    """Generate ``events`` events as the edge records them and run them through the
    processors as ``evd.state.runner`` does, keeping every output record."""
    from evd.state.processor import Outputs, PartitionProcessor
    from evd.state.runner import FETCH_BYTES, output_records

    raw = record(events, seed=seed, users=users, rate=rate)
    cfg = ProcessingConfig()
    first = records.header_of(raw.records[0][1], "raw").timestamp or 0
    procs = [PartitionProcessor(p, cfg, CHART_WINDOW_MS, now_ms=first)
             for p in range(raw.partitions)]
    closed_until: list[int | None] = [None] * raw.partitions
    offsets = [0] * raw.partitions
    out = Outputs()
    streams: dict[str, list[tuple[int, bytes]]] = {}

    def emit(p: int, now: int, forward: dict[int, Any]) -> None:
        appends, closed_until[p] = output_records(p, out, now, forward, closed_until[p])
        for stream, partition, payload in appends:
            streams.setdefault(stream, []).append((partition, payload))
        out.clear()

    now = first
    for fetch in plan_fetches(raw, FETCH_BYTES):
        p, now = fetch.partition, fetch.now
        forward: dict[int, Any] = {}
        for payload in fetch.payloads:
            batch, raw_events = records.decode_raw(payload)
            before = len(out.events)
            procs[p].process(SOURCE, batch, now, out, offsets[p])
            offsets[p] += len(payload)
            if len(out.events) > before and len(out.events[-1].events) == len(batch.events):
                forward[before] = raw_events
        procs[p].tick(now, frozenset((SOURCE,)) if fetch.more else frozenset(), out)
        emit(p, now, forward)
    # The end of the input: idle partitions close every session and window.
    final = now + cfg.session_gap_ms + cfg.max_out_of_orderness_ms + cfg.idle_timeout_ms \
        + CHART_WINDOW_MS
    for step in (now + cfg.idle_timeout_ms + 1, final):
        for p, proc in enumerate(procs):
            proc.tick(step, frozenset(), out)
            emit(p, step, {})
    stats = {
        stream: {
            "records": len(recs),
            "bytes": sum(len(r) for _, r in recs),
            "items": sum(rows.count_items(stream, records.decode(r, stream)) for _, r in recs),
        }
        for stream, recs in sorted(streams.items())
    }
    return Recording(streams, events, stats)


def cut_batches(recs: list[tuple[int, bytes]], stream: str, decode: Callable[[str, bytes], Any],
                max_items: int, max_bytes: int) -> list[Batch]:
    """``recs`` decoded and gathered as the delivery loop gathers them: a batch is
    written once it holds ``max_items`` items or ``max_bytes`` log bytes."""
    out: list[Batch] = []
    values: list[Any] = []
    partitions: list[int] = []
    count = nbytes = 0
    for p, payload in recs:
        value = decode(stream, payload)
        values.append(value)
        partitions.append(p)
        count += rows.count_items(stream, value)
        nbytes += len(payload)
        if count >= max_items or nbytes >= max_bytes:
            out.append(Batch(stream, values, count, nbytes, partitions))
            values, partitions, count, nbytes = [], [], 0, 0
    if values:
        out.append(Batch(stream, values, count, nbytes, partitions))
    return out


# ------------------------------------------------------------------- sinks
class NullSink(Sink):
    """Writes nothing: behind the delivery loop it leaves the loop's own cost."""

    async def write(self, batch: Batch) -> None:
        return None


def sink_config(spec: str, root: Path) -> AnySinkConfig | None:
    """The config of ``spec`` writing under ``root`` (None: the null sink)."""
    lake = str(root / "lake")
    if spec == "files-gzip":
        return FilesSinkConfig(name="lake", path=lake, compression="gzip")
    if spec == "files-zstd":
        return FilesSinkConfig(name="lake", path=lake, compression="zstd")
    if spec == "files-none":
        return FilesSinkConfig(name="lake", path=lake, compression="none")
    if spec == "parquet":
        return FilesSinkConfig(name="lake", path=lake, format="parquet")
    if spec == "sqlite":
        return SqliteSinkConfig(name="warehouse", path=str(root / "warehouse.sqlite3"))
    if spec == "stdout-devnull":
        return StdoutSinkConfig(name="stdout", streams=list(STREAMS))
    if spec == "null":
        return None
    raise ValueError(f"unknown sink {spec!r} (known: {', '.join(SPECS)})")


def make_sink(spec: str, cfg: AnySinkConfig | None, root: Path) -> Sink:
    ctx = SinkContext(data_dir=root, worker=0, workers=1, partitions=PARTITIONS,
                      chart_window_ms=CHART_WINDOW_MS,
                      open_consumer=lambda name: EmbeddedConsumer(root, name))
    if cfg is None:
        return NullSink()
    if isinstance(cfg, StdoutSinkConfig):
        from evd.sinks.stdout import StdoutSink

        return StdoutSink(cfg, ctx, fd=os.open(os.devnull, os.O_WRONLY))
    return build_sink(cfg, ctx)


def sink_streams(cfg: AnySinkConfig | None, wanted: list[str]) -> list[str]:
    """The streams of ``wanted`` the sink takes (its config's ``streams``)."""
    return [s for s in wanted if cfg is None or s in cfg.streams]


def landed(spec: str, root: Path, streams: list[str]) -> dict[str, int] | None:
    """Items of each of ``streams`` where the sink wrote them (None: nothing to count)."""
    if spec.startswith("files") or spec == "parquet":
        found = _lake_items(root / "lake")
        return {s: found.pop(s, 0) for s in streams} | found
    if spec == "sqlite":
        db = sqlite3.connect(root / "warehouse.sqlite3")
        try:
            return {s: db.execute(f"SELECT count(*) FROM {s}").fetchone()[0]
                    for s in streams}
        finally:
            db.close()
    return None


def _lake_items(lake: Path) -> dict[str, int]:
    """Lines (NDJSON) or rows (Parquet) of every data file, by the stream whose
    directory holds it (the ``_late`` layout's too; hidden temporary files and
    ``_progress`` are not data)."""
    out: dict[str, int] = {}
    for path in sorted(lake.rglob("*")):
        parts = path.relative_to(lake).parts
        if not path.is_file() or path.name.startswith((".", "_")) or parts[0] == "_progress":
            continue
        stream = next((s for s in parts if s in STREAMS), "other")
        name = path.name
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            n = pq.ParquetFile(path).metadata.num_rows
        elif name.endswith(".ndjson.gz"):
            with gzip.open(path, "rb") as f:
                n = sum(1 for _ in f)
        elif name.endswith(".ndjson.zst"):
            import zstandard

            with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as z:
                n = io.BufferedReader(z).read().count(b"\n")  # type: ignore[arg-type]
        elif name.endswith(".ndjson"):
            with open(path, "rb") as f:
                n = sum(1 for _ in f)
        else:
            continue
        out[stream] = out.get(stream, 0) + n
    return out


# ------------------------------------------------------------------ timing
#: Other processes' use of the pinned CPU during a run above which it is "not quiet".
NOISY_CORES = 0.1


class Meter:
    """Wall and CPU time of this process, and what other processes took of its CPU
    while it ran (when it is pinned to one: /proc/stat's busy time of that CPU
    less our own)."""

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.cpu = cpus[0] if len(cpus) == 1 else None

    def start(self) -> None:
        self.busy0 = cpus_busy([self.cpu])[0] if self.cpu is not None else 0.0
        self.c0 = time.process_time()
        self.w0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.w0
        cpu = time.process_time() - self.c0
        out: dict[str, Any] = {"seconds": seconds, "cpu_seconds": cpu}
        if self.cpu is not None:
            other = cpus_busy([self.cpu])[0] - self.busy0 - cpu
            out["other_cores"] = round(max(0.0, other) / seconds, 3)
        return out


def run_writes(spec: str, rec: Recording, wanted: list[str], batch: int) -> dict[str, Any]:
    """Time the sink alone: start, every write of every stream, flush, close."""
    with tempfile.TemporaryDirectory(prefix="evd-bench-sinks-") as tmp:
        root = Path(tmp)
        cfg = sink_config(spec, root)
        sink = make_sink(spec, cfg, root)
        streams = sink_streams(cfg, wanted)
        max_bytes = cfg.batch.max_bytes if cfg is not None else BatchConfig().max_bytes
        batches = {s: cut_batches(rec.streams.get(s, []), s, sink.decode, batch, max_bytes)
                   for s in streams}
        clock = time.perf_counter
        phases: dict[str, float] = {}

        async def go() -> None:
            t0 = clock()
            await sink.start()
            phases["start"] = clock() - t0
            for stream, bs in batches.items():
                t0 = clock()
                for b in bs:
                    await sink.write(b)
                phases[f"write {stream}"] = clock() - t0
            t0 = clock()
            await sink.flush()
            phases["flush"] = clock() - t0
            t0 = clock()
            await sink.close()
            phases["close"] = clock() - t0

        meter = Meter()
        gc.collect()
        gc.freeze()
        meter.start()
        uvloop.run(go())
        result: dict[str, Any] = {"mode": "write", **meter.stop()}
        gc.unfreeze()
        seconds, cpu = result["seconds"], result["cpu_seconds"]
        items = {s: sum(b.count for b in bs) for s, bs in batches.items()}
        result |= {
            "events_per_s": rec.events / seconds,
            "events_per_cpu_s": rec.events / cpu if cpu else None,
            "phases_s": phases,
            "items": items,
            "items_per_s": {s: items[s] / phases[f"write {s}"]
                            for s in streams if phases[f"write {s}"] > 0},
            "writes": {s: len(bs) for s, bs in batches.items()},
            "landed": landed(spec, root, streams),
            "disk_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
        }
        return result


def run_loop(spec: str, rec: Recording, wanted: list[str], batch: int) -> dict[str, Any]:
    """Time the sink behind the real delivery loop: an embedded log holding the
    records, a real consumer and audit ledger; from the loop's start until it has
    delivered everything and closed the sink."""
    from evd.core.log.embedded.consumer import EmbeddedConsumer
    from evd.core.log.embedded.producer import EmbeddedLog
    from evd.sinks.audit.ledger import Ledger
    from evd.sinks.delivery import DeliveryLoop

    with tempfile.TemporaryDirectory(prefix="evd-bench-sinks-") as tmp:
        root = Path(tmp)
        data = root / "data"
        cfg = sink_config(spec, root)
        sink = make_sink(spec, cfg, root)
        streams = sink_streams(cfg, wanted)
        base = cfg.batch if cfg is not None else BatchConfig()
        items = {s: sum(rows.count_items(s, records.decode(r, s))
                        for _, r in rec.streams.get(s, [])) for s in streams}
        result: dict[str, Any] = {}

        async def go() -> None:
            lg = EmbeddedLog(data, PARTITIONS, writer=0, fsync="never")
            await lg.start()
            appends = [(s, p, payload) for s in streams for p, payload in rec.streams.get(s, [])]
            for i in range(0, len(appends), 1000):
                await lg.append_all(appends[i:i + 1000], internal=True)
            await lg.flush()
            ledger = Ledger(data)
            consumer = EmbeddedConsumer(data, "bench")
            loop = DeliveryLoop(
                name="bench", sink=sink, consumer=consumer, producer=lg, ledger=ledger,
                streams=streams, partitions=list(range(PARTITIONS)),
                batch=BatchConfig(max_events=batch, max_bytes=base.max_bytes,
                                  max_age_s=base.max_age_s),
                retry=RetryConfig(max_attempts=1),
            )
            meter = Meter()
            gc.collect()
            gc.freeze()
            meter.start()
            await loop.start()
            # The loop's own steps while records wait (fetches never wait then), then
            # run() after stop(): the pending batches, flush, close.
            while consumer.backlog():
                await loop.step()
            loop.stop()
            await loop.run()
            result.update(meter.stop())
            gc.unfreeze()
            result["delivered"] = loop.delivered
            result["dead_lettered"] = loop.dead_lettered
            await consumer.close()
            await lg.close()

        uvloop.run(go())
        seconds, cpu = result["seconds"], result["cpu_seconds"]
        result.update({
            "mode": "loop",
            "events_per_s": rec.events / seconds,
            "events_per_cpu_s": rec.events / cpu if cpu else None,
            "items": items,
            "landed": landed(spec, root, streams),
        })
        return result


# ----------------------------------------------------------------- driving
def noisy(run: dict[str, Any]) -> bool:
    """Other processes took a share of the run's CPU."""
    return bool(run.get("other_cores", 0.0) >= NOISY_CORES)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    ok = sorted([r for r in ok if not noisy(r)] or ok, key=lambda r: r["events_per_s"])
    return ok[(len(ok) - 1) // 2] if ok else runs[0]


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run of ``name`` by events/s (of the quiet runs when there are
    any), with every run, which were quiet, and the spread."""
    med = _median_run(runs)
    out = {**med, "runs": [r.get("events_per_s", r.get("error")) for r in runs],
           "quiet": [not noisy(r) for r in runs if "error" not in r]}
    ok = [r["events_per_s"] for r in runs if "error" not in r]
    if len(ok) > 1:
        out["spread"] = (max(ok) - min(ok)) / statistics.median(ok)
    spec = name.split(" ")[0]
    if spec in TARGETS and "events_per_s" in med:
        out["target"] = TARGETS[spec]
        out["meets_target"] = med["events_per_s"] >= TARGETS[spec]
    return out


def line(name: str, r: dict[str, Any]) -> str:
    """One printed line per sink (and mode)."""
    if "error" in r:
        return f"{name:<24} failed: {str(r['error']).strip().splitlines()[-1]}"
    quiet = iter(r["quiet"])
    runs = ", ".join(f"{x:,.0f}{'' if next(quiet) else '*'}" if isinstance(x, float)
                     else "failed" for x in r["runs"])
    text = (f"{name:<24} {r['events_per_s']:>10,.0f} events/s  "
            f"{r['events_per_cpu_s'] or 0:>10,.0f} per CPU-s  [{runs}]")
    if "target" in r:
        text += f"  target {r['target']:,}: {'met' if r['meets_target'] else 'NOT met'}"
    if r.get("landed") is not None and r["landed"] != r["items"]:
        text += f"  LANDED {r['landed']} != WRITTEN {r['items']}"
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sinks",
        description="Each sink alone on one core, on recorded batches of the output streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="events to generate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--users", type=int, default=20_000, help="user population")
    p.add_argument("--rate", type=float, default=100.0, help="events per second of event time")
    p.add_argument("--sinks", default=DEFAULT_SINKS, help=f"comma-separated, of {', '.join(SPECS)}")
    p.add_argument("--streams", default=Stream.EVENTS,
                   help="streams written (each sink takes those its config lists): "
                        "events, sessions, charts")
    p.add_argument("--batch", type=int, default=BATCH, help="items per write at most")
    p.add_argument("--loop", action="store_true",
                   help="also run each sink (and the null sink) behind the delivery loop")
    p.add_argument("--repeat", type=int, default=3, help="runs per sink (the median is kept)")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds until other processes use "
                        "under 0.1 of the pinned CPU")
    p.add_argument("--in-process", action="store_true",
                   help="run in this process instead of a forked child per run (profilers)")
    p.add_argument("--out", type=Path, default=Path("bench-out/sinks"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    specs = [s.strip() for s in args.sinks.split(",") if s.strip()]
    wanted = [s.strip() for s in args.streams.split(",") if s.strip()]
    bad = [s for s in specs if s not in SPECS] + [s for s in wanted if s not in STREAMS]
    if bad or args.events < 1 or args.repeat < 1 or args.batch < 1:
        print(f"bad options: {', '.join(bad) or 'events, repeat and batch must be >= 1'}",
              file=sys.stderr)
        return 2
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rec = record_outputs(args.events, seed=args.seed, users=args.users, rate=args.rate)
    record_seconds = time.perf_counter() - t0
    gc.collect()
    jobs: dict[str, Callable[[], dict[str, Any]]] = {}
    for spec in specs:
        jobs[spec] = partial(run_writes, spec, rec, wanted, args.batch)
    if args.loop:
        for spec in specs if "null" in specs else [*specs, "null"]:
            jobs[f"{spec} (loop)"] = partial(run_loop, spec, rec, wanted, args.batch)
    run_one: Callable[[Callable[[], dict[str, Any]]], dict[str, Any]] = (
        (lambda fn: fn()) if args.in_process else in_child)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for i in range(args.repeat):
        for name, job in jobs.items():
            print(f"run {i + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
            if args.wait_quiet > 0 and args.cpu is not None:
                wait_quiet([args.cpu], args.wait_quiet)
            runs[name].append(run_one(job))
    report: dict[str, Any] = {
        "config": {
            "events": args.events, "seed": args.seed, "users": args.users, "rate": args.rate,
            "streams": wanted, "batch": args.batch, "repeat": args.repeat, "cpu": args.cpu,
            "affinity": sorted(os.sched_getaffinity(0)),
            "isolation": "in-process" if args.in_process else "fork per run",
            "python": platform.python_version(), "machine": platform.machine(),
            "evd_commit": _git_commit(), "evd_uncommitted": _git_dirty(),
        },
        "input": {"events": rec.events, "record_seconds": record_seconds, **rec.stats},
        "sinks": {name: summarize(name, rs) for name, rs in runs.items()},
    }
    null = report["sinks"].get("null (loop)", {})
    if "seconds" in null:
        report["loop_overhead_us_per_event"] = null["seconds"] / rec.events * 1e6
    (args.out / "sinks.json").write_text(json.dumps(report, indent=2) + "\n")
    ev = rec.stats.get(Stream.EVENTS, {})
    print(f"input: {rec.events:,} events -> {ev.get('records', 0):,} events records "
          f"({ev.get('bytes', 0) / max(1, ev.get('items', 1)):.0f} bytes per event); "
          f"streams {', '.join(wanted)}, batches of {args.batch:,}; "
          f"recorded in {record_seconds:.1f} s")
    for name, r in report["sinks"].items():
        print(line(name, r))
    if "loop_overhead_us_per_event" in report:
        print(f"delivery loop alone (null sink): "
              f"{report['loop_overhead_us_per_event']:.2f} us per event")
    if any(not q for r in report["sinks"].values() for q in r.get("quiet", [])):
        print(f"* not quiet: other processes took {NOISY_CORES} of the CPU or more during "
              "the run (the median is of the quiet runs when there are any)")
    print(f"written: {args.out / 'sinks.json'}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    mismatch = any(r.get("landed") is not None and r["landed"] != r.get("items")
                   for r in report["sinks"].values())
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
