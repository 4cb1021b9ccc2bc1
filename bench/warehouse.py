"""The warehouse's CPU per event: seed-shaped events through ``SqliteSink.write``.

Each run is a fresh child process and a fresh database file: ``--events``
seed-shaped events (tests/data/seed-event.json, each with a random uuid4
``event_id``, its own user and a timestamp a millisecond after the last), in
``events`` records of ``--record`` events (msgpack-encoded and decoded again as
the delivery loop does, outside the timing), handed to ``write`` in batches of
``--batch`` events. It reports the CPU seconds of the process (every thread:
the sink's thread does the work) from ``start()`` to ``close()``, per event;
with ``--probe``, how late the event loop wakes from 1 ms sleeps meanwhile.

``--base DIR`` names another source tree of evd (say ``git archive ecb77c9 |
tar -x -C /tmp/base``): runs alternate between it and this checkout, so a
slower or faster moment of a shared machine hits both alike.

    python -m bench.warehouse --events 200000 --runs 5 --base /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SEED = Path(__file__).resolve().parents[1] / "tests" / "data" / "seed-event.json"


def child(events: int, batch: int, record: int, rng_seed: int, dry: bool = False,
          probe: bool = False) -> dict[str, Any]:
    """One run in this process: the input, then the timed writes; with ``probe``,
    how late the event loop wakes from 1 ms sleeps meanwhile (the sink's thread
    holding the GIL makes it late), instead of the CPU time."""
    import asyncio
    import gc
    import random
    import resource
    import statistics
    import time
    import uuid
    from datetime import UTC, datetime, timedelta

    from evd.core.log import records
    from evd.core.log.streams import Stream
    from evd.core.schema import EventsBatch, event_decoder
    from evd.sinks.base import Batch, SinkContext
    from evd.sinks.sqlite import SqliteSink, SqliteSinkConfig

    rng = random.Random(rng_seed)
    seed = event_decoder.decode(SEED.read_bytes())
    t0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    received = int(t0.timestamp() * 1000)
    payloads = []
    for start in range(0, events, record):
        evs = []
        for i in range(start, min(events, start + record)):
            evs.append(type(seed)(
                event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                timestamp=t0 + timedelta(milliseconds=i),
                user_id=f"user-{rng.randrange(100_000)}",
                track_id=seed.track_id, playback=seed.playback, context=seed.context,
                device=seed.device, geo=seed.geo,
            ))
        value = EventsBatch(received + start // 10, evs)
        payloads.append(records.encode(records.Kind.EVENTS, value.received_at, value))
    values = [records.decode(p, Stream.EVENTS) for p in payloads]
    per = max(1, batch // record)
    batches = [
        Batch(Stream.EVENTS, values[i:i + per], sum(len(v.events) for v in values[i:i + per]),
              sum(len(p) for p in payloads[i:i + per]))
        for i in range(0, len(values), per)
    ]
    if dry:  # the input alone: what an instruction count of a run subtracts
        return {"events": events, "cpu_s": 0.0, "us_per_event": 0.0, "user_us": 0.0,
                "system_us": 0.0}
    with tempfile.TemporaryDirectory(prefix="evd-bench-warehouse-") as tmp:
        ctx = SinkContext(Path(tmp), 0, 1, 8, 60_000, lambda name: None)  # type: ignore[arg-type,return-value]
        sink = SqliteSink(SqliteSinkConfig(name="warehouse"), ctx)

        lateness: list[float] = []

        async def wake_up() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lateness.append(time.perf_counter() - t - 0.001)

        async def run() -> tuple[float, float]:
            gc.collect()
            task = asyncio.create_task(wake_up()) if probe else None
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            await sink.start()
            for b in batches:
                await sink.write(b)
            await sink.close()
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            if task is not None:
                task.cancel()
            return r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime

        user, system = asyncio.run(run())
        cpu = user + system
        import sqlite3

        with sqlite3.connect(Path(tmp) / "warehouse.sqlite3") as conn:
            (rows,) = conn.execute("SELECT count(*) FROM events").fetchone()
    if rows != events:
        raise SystemExit(f"{rows} rows landed of {events}")
    out = {"events": events, "cpu_s": cpu, "us_per_event": cpu / events * 1e6,
           "user_us": user / events * 1e6, "system_us": system / events * 1e6}
    if probe:
        cuts = statistics.quantiles(lateness, n=100)
        out |= {"late_p50_ms": cuts[49] * 1e3, "late_p99_ms": cuts[98] * 1e3,
                "late_max_ms": max(lateness) * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=10_000, help="events per write")
    ap.add_argument("--record", type=int, default=12,
                    help="events per record (a request's for one partition: about 12 of 100 in 8)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each tree, alternating")
    ap.add_argument("--base", type=Path, help="another evd source tree to alternate with")
    ap.add_argument("--cpu", type=int, help="pin the children to this CPU")
    ap.add_argument("--child", action="store_true",
                    help="one run in this process, its result as JSON (what the runs start)")
    ap.add_argument("--dry", action="store_true",
                    help="with --child: only build the input (subtracted from an instruction count)")
    ap.add_argument("--probe", action="store_true",
                    help="report how late the event loop wakes while the sink writes, not CPU")
    args = ap.parse_args()
    if args.child:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        import evd

        result = child(args.events, args.batch, args.record, 1, args.dry, args.probe)
        print(json.dumps(result | {"evd": str(Path(evd.__file__).parent)}))
        return
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here} | ({"base": args.base.resolve()} if args.base else {})
    got: dict[str, list[float]] = {name: [] for name in trees}
    for run in range(args.runs):
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{here}")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(args.events),
                   "--batch", str(args.batch), "--record", str(args.record)]
            if args.probe:
                cmd.append("--probe")
            if args.cpu is not None:
                cmd += ["--cpu", str(args.cpu)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                 cwd=tree).stdout
            result = json.loads(out.strip().splitlines()[-1])
            got[name].append(result["us_per_event"])
            if args.probe:
                print(f"run {run + 1} {name}: event loop late by p50 {result['late_p50_ms']:.2f}"
                      f" ms, p99 {result['late_p99_ms']:.2f}, max {result['late_max_ms']:.2f}",
                      flush=True)
                continue
            print(f"run {run + 1} {name}: {result['us_per_event']:.2f} µs of CPU per event"
                  f" (user {result['user_us']:.2f}, system {result['system_us']:.2f};"
                  f" {result['evd']})", flush=True)
    for name, values in got.items():
        if args.probe:
            break
        print(f"{name}: median {statistics.median(values):.2f} µs per event,"
              f" runs {', '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
