"""The Kafka roles per CPU-second: an edge, a process and a deliver pod against Tansu.

One command, the whole pipeline as process groups: for each of ``--runs`` rounds,
a fresh Tansu broker (bench.tansu) and three pods of the same binary with
``log.backend: kafka`` and the default config's sinks (lake, warehouse, audit):
``evd serve --roles deliver``, ``--roles process`` and ``--roles edge``, one
worker each, each pinned to its ``--*-cpu``. Once the process and deliver pods
run their partitions, this process (on ``--load-cpu``) sends seed-shaped batches
of ``--batch`` events, stamped with the wall clock and unique ids, closed loop
(``bench/versus.py``'s load), for ``--duration`` seconds, then waits until
every stage has caught up, bounded by ``--drain-timeout``: the process pod has
taken in every event the edge pod accepted and has no raw lag, the deliver
pod's warehouse ``events`` table holds them all and every sink's and the
audit's lag is 0 bytes, still so one gauge interval later.

The cost counted per pod is the CPU seconds of its process tree (supervisor and
worker) from the start of the load until drained; each pod's figure is accepted
events (the edge pod's count) per CPU second, and ``all pods`` is accepted
events per CPU second of the three together (the broker and the load are
reported beside, not counted). Each pod's CPU while idle (``--idle`` seconds
before the load) is reported too: the part of its cost that is time, not
events. The warehouse's ``events`` table is counted
again once the pods stopped: every accepted event must be there once. Prints a
table and writes ``kafkacost.json`` to ``--out``.

    python -m bench.kafkacost --batch 100 --duration 10 --runs 3 \\
        --edge-cpu 0 --process-cpu 0 --deliver-cpu 0 --broker-cpu 1 --load-cpu 1
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.pipeline import free_port, scrape
from bench.scaling import tree_cpu
from bench.tansu import Broker
from bench.versus import _load
from evd.bench import metrics

#: Pods in the order they start (consumers first, so the edge's first record is read).
ROLES = ("deliver", "process", "edge")
#: The log line each role writes once its group gave it partitions.
ASSIGNED = {"deliver": "delivery of partitions", "process": "processors of partitions"}
PARTITIONS = 8
#: Longest wait for a pod to serve /metrics and, for process and deliver, to get partitions.
START_S = 60.0
#: How often the drain is polled.
POLL_S = 0.25
#: How long every stage must stay caught up to count as drained (over the gauges' 1 s).
CONFIRM_S = 1.1


class Pod:
    """One ``evd serve --roles ROLE --workers 1`` on a free port, its log in ``dir/ROLE.log``."""

    def __init__(self, role: str, cpu: int | None, config: Path, tmp: Path) -> None:
        self.role = role
        self.port = free_port()
        self.data_dir = tmp / role
        self.log = tmp / f"{role}.log"
        own = os.sched_getaffinity(0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # inherited by the pod's supervisor and worker
        try:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "evd", "serve", "--workers", "1",
                     "--port", str(self.port), "--data-dir", str(self.data_dir),
                     "--config", str(config), "--roles", role],
                    stdout=out, stderr=subprocess.STDOUT,
                )
        finally:
            os.sched_setaffinity(0, own)

    def wait_ready(self, deadline: float) -> None:
        """Until the pod serves /metrics and, for process and deliver, runs its partitions."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.role} pod exited with {self.proc.returncode}:"
                                   f" {self.log.read_text()[-2000:]}")
            try:
                scrape(self.port)
                if self.role not in ASSIGNED or ASSIGNED[self.role] in self.log.read_text():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the {self.role} pod was not ready within {START_S} s:"
                           f" {self.log.read_text()[-2000:]}")

    def cpu(self) -> float:
        return sum(tree_cpu(self.proc.pid).values())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stage_state(pods: dict[str, Pod], base: dict[str, float] | None = None) -> dict[str, Any]:
    """What the drain waits on: events accepted (edge pod), processed (process pod) and
    in the warehouse's ``events`` table (deliver pod) since ``base`` (a state before), and each stage's lag in bytes."""
    process, deliver = scrape(pods["process"].port), scrape(pods["deliver"].port)
    now = {
        "accepted": metrics.total(scrape(pods["edge"].port), metrics.ACCEPTED) or 0.0,
        "processed": metrics.total(process, "evd_processor_events_total") or 0.0,
        "stored": float(warehouse_events(pods["deliver"].data_dir)),
    }
    return {
        **{k: v - (base[k] if base else 0.0) for k, v in now.items()},
        "lag_bytes": {"processor": metrics.total(process, "evd_processor_lag_bytes_sum") or 0.0,
                      **metrics.by_label(deliver, "evd_sink_lag_bytes", "sink")},
    }


def caught_up(state: dict[str, Any]) -> bool:
    """The process pod took in every event the edge accepted and reads nothing behind;
    the deliver pod stored them all in the warehouse and every sink's (and the
    audit's) lag is 0 bytes."""
    return (
        state["processed"] >= state["accepted"]
        and state["stored"] >= state["accepted"]
        and len(state["lag_bytes"]) > 1
        and all(v == 0 for v in state["lag_bytes"].values())
    )


def warehouse_events(data_dir: Path) -> int:
    """Rows in the deliver pod's warehouse ``events`` table (0 before it exists)."""
    try:
        db = sqlite3.connect(f"file:{data_dir / 'warehouse.sqlite3'}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0  # no file yet
    try:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # no table yet
    finally:
        db.close()


def run_round(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    own = os.sched_getaffinity(0)
    if args.broker_cpu is not None:
        os.sched_setaffinity(0, {args.broker_cpu})
    try:
        broker = Broker(log_path=tmp / "broker.log").start()
    finally:
        os.sched_setaffinity(0, own)
    pods: dict[str, Pod] = {}
    try:
        config = tmp / "evd.json"
        config.write_text(json.dumps({
            "log": {"backend": "kafka", "partitions": PARTITIONS},
            "kafka": {"bootstrap_servers": [broker.bootstrap], "topic_prefix": f"cost{n}.",
                      "idempotence": False, "linger_ms": args.linger_ms},
            "snapshot": {"dir": str(tmp / "state")},
        }))
        deadline = time.monotonic() + START_S
        for role in ROLES:
            pods[role] = Pod(role, getattr(args, f"{role}_cpu"), config, tmp)
        for pod in pods.values():
            pod.wait_ready(deadline)
        if args.load_cpu is not None:
            os.sched_setaffinity(0, {args.load_cpu})
        assert broker.proc is not None
        base = stage_state(pods)

        def cpu_now() -> dict[str, float]:
            assert broker.proc is not None
            return {**{role: pod.cpu() for role, pod in pods.items()},
                    "broker": sum(tree_cpu(broker.proc.pid).values()),
                    "load": time.process_time(), "wall": time.perf_counter()}

        idle0 = cpu_now()
        time.sleep(args.idle)
        cpu0 = cpu_now()
        idle = {role: (cpu0[role] - idle0[role]) / (cpu0["wall"] - idle0["wall"]) for role in pods}
        answered, statuses = uvloop.run(_load(args, pods["edge"].port))
        load_s = time.perf_counter() - cpu0["wall"]
        # Counted until the first poll that finds every stage caught up, once a poll
        # a gauge interval later still does (a lag gauge is published once a second
        # and may be that stale).
        since: dict[str, float] | None = None
        deadline = time.monotonic() + args.drain_timeout
        while True:
            state = stage_state(pods, base)
            if not caught_up(state):
                since = None
            elif since is None:
                since = cpu_now()
            elif time.perf_counter() - since["wall"] >= CONFIRM_S:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        drained = since is not None and time.perf_counter() - since["wall"] >= CONFIRM_S
        cpu1 = since if drained and since is not None else cpu_now()
        cpu = {role: cpu1[role] - cpu0[role] for role in pods}
        other = {k: cpu1[k] - cpu0[k] for k in ("broker", "load", "wall")}
    finally:
        for pod in pods.values():
            pod.stop()
        broker.stop()
    stored = warehouse_events(pods["deliver"].data_dir)  # after the deliver pod stopped
    total_cpu = sum(cpu.values())
    # The edge's count: the load counts the answers it got before the end, not
    # those of the requests in flight then (at most --connections of them).
    accepted = int(state.pop("accepted"))
    return {
        "accepted": accepted,
        "answered_in_load": answered,
        "statuses": statuses,
        "load_s": round(load_s, 2),
        "done_s": round(other["wall"], 2),
        "drained": drained,
        "stages_at_end": state,
        "warehouse_events": stored,
        "pods": {
            role: {"cpu_s": round(c, 3), "events_per_cpu_s": round(accepted / c) if c else 0,
                   "idle_cpu_cores": round(idle[role], 4)}
            for role, c in cpu.items()
        },
        "all_pods": {"cpu_s": round(total_cpu, 3),
                     "events_per_cpu_s": round(accepted / total_cpu) if total_cpu else 0},
        "broker_cpu_s": round(other["broker"], 3),
        "load_cpu_s": round(other["load"], 3),
        "events_per_s": round(accepted / load_s) if load_s else 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100, help="events per request (1: single events)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per round")
    p.add_argument("--runs", type=int, default=3, help="rounds, each with a fresh broker and pods")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--linger-ms", type=int, default=2, help="kafka.linger_ms of the pods")
    for role in ROLES:
        p.add_argument(f"--{role}-cpu", type=int, default=None, help=f"pin the {role} pod to this CPU")
    p.add_argument("--broker-cpu", type=int, default=None, help="pin the broker to this CPU")
    p.add_argument("--load-cpu", type=int, default=None, help="pin the load to this CPU")
    p.add_argument("--idle", type=float, default=2.0,
                   help="seconds before the load in which each pod's idle CPU is measured")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="longest wait for the process and deliver pods to catch up after the load")
    p.add_argument("--out", type=Path, default=Path("bench-out/kafkacost"))
    p.add_argument("--keep-logs", type=Path, default=None,
                   help="copy each round's pod and broker logs into this directory")
    args = p.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    print(f"{'run':>4} {'events':>9} {'drained':>8} "
          + " ".join(f"{r + ' ev/CPU-s':>17}" for r in (*ROLES[::-1], "all pods"))
          + f" {'broker CPU-s':>13}", flush=True)
    for n in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="evd-kafkacost-") as tmp:
            try:
                r = run_round(args, n, Path(tmp))
            finally:
                if args.keep_logs is not None:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log in Path(tmp).glob("*.log"):
                        (args.keep_logs / f"run{n + 1}-{log.name}").write_bytes(log.read_bytes())
        rounds.append(r)
        figures = [r["pods"][role]["events_per_cpu_s"] for role in ROLES[::-1]]
        figures.append(r["all_pods"]["events_per_cpu_s"])
        drained = f"{'yes' if r['drained'] else 'NO'} {r['done_s']:.0f}s"
        print(f"{n + 1:>4} {r['accepted']:>9,} {drained:>8} "
              + " ".join(f"{f:>17,}" for f in figures) + f" {r['broker_cpu_s']:>13.2f}",
              flush=True)
        if r["warehouse_events"] != r["accepted"]:
            print(f"     warehouse holds {r['warehouse_events']:,} events of"
                  f" {r['accepted']:,} accepted", flush=True)
    median = {role: statistics.median(r["pods"][role]["events_per_cpu_s"] for r in rounds)
              for role in ROLES}
    median["all_pods"] = statistics.median(r["all_pods"]["events_per_cpu_s"] for r in rounds)
    print(f"batch {args.batch}, median of {len(rounds)}: "
          + ", ".join(f"{k} {v:,.0f}" for k, v in median.items()) + " events per CPU-second")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kafkacost.json").write_text(json.dumps(
        {"batch": args.batch, "duration_s": args.duration, "connections": args.connections,
         "rounds": rounds, "median_events_per_cpu_s": median}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
