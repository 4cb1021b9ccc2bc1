"""The delivery loops' own CPU per event: the default server's three loops (lake,
warehouse, audit) on one worker, behind sinks that write nothing.

One run records the input once: ``--events`` listening events from the traffic
model in requests of ``--batch`` events (``bench.processing.record``: a request
is one ``raw`` record per partition it touches, so 100 events over 8 partitions
make records of about 12.5 events, and 1 event a record of one), run through
evd's own processors and ``output_records`` as ``evd.state.runner`` does: the
``raw``, ``events``, ``sessions`` and ``charts`` records, in the order a worker
appends them. Then, in a forked child (fresh heap) per run:

- ``backlog``: every record is in an embedded log (fsync never) before the
  loops start; the CPU of the process (every thread: the ledger's, the offset
  writes') from ``Stages.start_deliveries`` over all 8 partitions until every
  loop has read its streams to the end and ``stop_deliveries`` has written and
  committed what they gathered.
- ``live``: the loops start on an empty log and a feeder appends the records at
  ``--rate`` events/s (every 10 ms what is due), the way an edge and a
  processor append them; the loops read them as they come (small fetches, most
  batches closed by ``max_age_s``: what a server under steady load does). The
  CPU from the start until they caught up, less the feeder's own CPU measured
  in a run without the loops (``feed``), interleaved with the others.

The sinks are the default config's (``evd.stages.Stages`` builds the loops, so
the wiring is the server's), with every sink's ``write`` replaced by nothing
(``--sinks null``, the default: the loop's own cost: fetch, decode, batching,
ledger and offset commits) or the real lake and warehouse (``--sinks real``).
``--repeat`` runs of each mode interleaved; the medians are printed as CPU µs
per event.

    python -m bench.delivery --events 200000 --batch 100 --repeat 5
    python -m bench.delivery --events 50000 --batch 1 --modes live --rate 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.processing import CHART_WINDOW_MS, SOURCE, in_child, plan_fetches, record
from evd.core.config import ProcessingConfig
from evd.core.log import records
from evd.core.log.streams import Stream
from evd.sinks.base import Batch, Sink

#: The feeder's tick in live mode.
TICK_S = 0.01
#: How often the run looks whether every loop has caught up.
POLL_S = 0.02

Append = tuple[str, int, bytes]


class NullSink(Sink):
    """Writes nothing: behind the delivery loop it leaves the loop's own cost."""

    async def write(self, batch: Batch) -> None:
        return None


def record_appends(events: int, batch: int, seed: int = 1) -> tuple[list[Append], list[int]]:
    """Every record a worker appends for ``events`` events in requests of ``batch``:
    each raw record, then the processor's outputs of the pass that took it; and,
    per append, the events it holds (raw records only, else 0)."""
    from evd.state.processor import Outputs, PartitionProcessor
    from evd.state.runner import FETCH_BYTES, output_records

    raw = record(events, seed=seed, batch=batch)
    cfg = ProcessingConfig()
    first = records.header_of(raw.records[0][1], Stream.RAW).timestamp or 0
    procs = [PartitionProcessor(p, cfg, CHART_WINDOW_MS, now_ms=first)
             for p in range(raw.partitions)]
    closed_until: list[int | None] = [None] * raw.partitions
    offsets = [0] * raw.partitions
    out = Outputs()
    appends: list[Append] = []
    weights: list[int] = []

    def emit(p: int, now: int, forward: dict[int, Any]) -> None:
        more, closed_until[p] = output_records(p, out, now, forward, closed_until[p])
        appends.extend(more)
        weights.extend([0] * len(more))
        out.clear()

    now = first
    for fetch in plan_fetches(raw, FETCH_BYTES):
        p, now = fetch.partition, fetch.now
        forward: dict[int, Any] = {}
        for payload in fetch.payloads:
            value, raw_events = records.decode_raw(payload)
            appends.append((Stream.RAW, p, payload))
            weights.append(len(value.events))
            before = len(out.events)
            procs[p].process(SOURCE, value, now, out, offsets[p])
            offsets[p] += len(payload)
            if len(out.events) > before and len(out.events[-1].events) == len(value.events):
                forward[before] = raw_events
            # The live runner passes over what arrived: one record at batch 1.
            if batch == 1:
                procs[p].tick(now, frozenset((SOURCE,)), out)
                emit(p, now, forward)
                forward = {}
        procs[p].tick(now, frozenset((SOURCE,)) if fetch.more else frozenset(), out)
        emit(p, now, forward)
    final = now + cfg.session_gap_ms + cfg.max_out_of_orderness_ms + cfg.idle_timeout_ms \
        + CHART_WINDOW_MS
    for step in (now + cfg.idle_timeout_ms + 1, final):
        for p, proc in enumerate(procs):
            proc.tick(step, frozenset(), out)
            emit(p, step, {})
    return appends, weights


def run(mode: str, appends: list[Append], weights: list[int], rate: float,
        sinks: str) -> dict[str, Any]:
    """One measured run (in a forked child): see the module docstring."""
    import evd.stages
    from evd.config import Config
    from evd.core.config import ServerConfig
    from evd.core.log.embedded.consumer import EmbeddedConsumer
    from evd.core.log.embedded.producer import EmbeddedLog
    from evd.stages import Stages

    if sinks == "null":
        evd.stages.build_sink = lambda cfg, ctx: NullSink()  # type: ignore[assignment]
    result: dict[str, Any] = {"mode": mode}
    with tempfile.TemporaryDirectory(prefix="evd-bench-delivery-") as tmp:
        data = Path(tmp)
        cfg = Config(server=ServerConfig(data_dir=str(data)))

        async def go() -> None:
            lg = EmbeddedLog(data, 8, writer=0, fsync="never")
            await lg.start()

            def failed(exc: BaseException) -> None:
                raise SystemExit(f"a stage failed: {exc!r}")

            stages = Stages(cfg, lg, lambda name: EmbeddedConsumer(data, name), (0,), failed)
            if mode == "backlog":
                for i in range(0, len(appends), 1000):
                    await lg.append_all(appends[i:i + 1000], internal=True)
                await lg.flush()
            gc.collect()
            gc.freeze()
            c0 = time.process_time()
            w0 = time.perf_counter()
            if mode != "feed":
                await stages.start_deliveries(range(8))
            if mode in ("live", "feed"):
                i = fed = 0
                start = time.perf_counter()
                while i < len(appends):
                    due = (time.perf_counter() - start) * rate
                    j = i
                    # What is due, and the processor's outputs that follow it.
                    while j < len(appends) and (fed < due or weights[j] == 0):
                        fed += weights[j]
                        j += 1
                    if j > i:
                        await lg.append_all(appends[i:j], internal=True)
                        i = j
                    await asyncio.sleep(TICK_S)
                await lg.flush()
            loops = [loop for loop, _ in stages.deliveries]
            # Until every loop has read its streams to their ends (positions only:
            # the wait costs nothing per unit of time, so instruction counts under
            # valgrind do not grow with its slower clock).
            ends = [await loop.consumer.end_offsets() for loop in loops]
            while any(loop.consumer.positions().get(s, -1) < end
                      for loop, loop_ends in zip(loops, ends, strict=True)
                      for s, end in loop_ends.items()):
                await asyncio.sleep(POLL_S)
            await stages.stop_deliveries()
            cpu = time.process_time() - c0
            result.update(seconds=time.perf_counter() - w0, cpu_seconds=cpu)
            gc.unfreeze()
            result["delivered"] = {loop.name: loop.delivered for loop in loops}
            shared = next((d for loop in loops if (d := getattr(loop, "decoded", None)) is not None), None)
            if shared is not None:
                result["shared_decodes"] = {"hits": shared.hits, "misses": shared.misses}
            await stages.close()
            await lg.close()

        uvloop.run(go())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=100, help="events per request")
    p.add_argument("--modes", default="backlog,live", help="backlog, live (comma-separated)")
    p.add_argument("--rate", type=float, default=None,
                   help="live: events/s (default 20000 at batch 100, 5000 at batch 1)")
    p.add_argument("--sinks", choices=("null", "real"), default="null")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--json", default=None, help="write the runs here")
    p.add_argument("--input-cache", default=None,
                   help="keep the recorded input in this file (reused when it exists)")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    rate = args.rate or (20_000.0 if args.batch >= 100 else 5_000.0)
    t = time.perf_counter()
    cache = Path(args.input_cache) if args.input_cache else None
    if cache is not None and cache.exists():
        appends, weights = pickle.loads(cache.read_bytes())
    else:
        appends, weights = record_appends(args.events, args.batch)
        if cache is not None:
            cache.write_bytes(pickle.dumps((appends, weights)))
    events = sum(weights)
    counts: dict[str, int] = {}
    for stream, _, _ in appends:
        counts[stream] = counts.get(stream, 0) + 1
    print(f"input: {events} events in requests of {args.batch}; records {counts}"
          f" ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
    modes = [m for m in args.modes.split(",") if m]
    if "live" in modes:
        modes.append("feed")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.repeat):
        for m in modes:
            res = in_child(lambda m=m: run(m, appends, weights, rate, args.sinks))  # type: ignore[misc]
            if "error" in res:
                print(res["error"], file=sys.stderr)
                return 1
            runs[m].append(res)
            print(f"run {r + 1} {m}: {res['cpu_seconds']:.3f} CPU-s, {res['seconds']:.2f} s,"
                  f" {1e6 * res['cpu_seconds'] / events:.2f} µs/event"
                  f" {res.get('shared_decodes', '')}", file=sys.stderr)
    summary: dict[str, Any] = {"events": events, "batch": args.batch, "rate": rate,
                               "sinks": args.sinks}
    for m in modes:
        if m == "feed":
            continue
        cpus = [x["cpu_seconds"] for x in runs[m]]
        if m == "live":
            feeds = [x["cpu_seconds"] for x in runs["feed"]]
            cpus = [c - f for c, f in zip(cpus, feeds, strict=True)]
        summary[m] = {
            "cpu_us_per_event": [round(1e6 * c / events, 2) for c in cpus],
            "median_us_per_event": round(1e6 * statistics.median(cpus) / events, 2),
        }
        print(f"{m}: {summary[m]['median_us_per_event']} µs of CPU per event (median;"
              f" runs {summary[m]['cpu_us_per_event']})")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
