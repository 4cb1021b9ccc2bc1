"""Edge -> Kafka -> processor throughput against the Tansu test broker.

Starts a Tansu broker (bench.tansu), one edge pod (``evd serve --roles edge
--workers 1``) pinned to ``--edge-cpu`` and, with ``--process``, one process pod
(``--roles process``); then sends seed-shaped batches (bench.seedload's
requests, 100 events from 100 random users each, so a request touches most
partitions) at a paced rate or as fast as the edge answers (``--rates max``).
A 200 means the broker acknowledged every record of the request (``acks=all``).

Reported per rate: events/s accepted (= into the raw topic), the raw topic's
records and bytes per second and events per record (read from the topic's end
offsets), the edge's CPU per event, p99 latency; with ``--process``, the events
the processor took per second during the load and its lag at the end.

    python -m bench.kafka --rates max --duration 15 --edge-cpu 0 --load-cpu 1 --broker-cpu 1
    python -m bench.kafka --rates 20000,40000 --process --process-cpu 1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.pipeline import drive, free_port, scrape
from bench.scaling import tree_cpu
from bench.tansu import Broker
from evd.bench import metrics
from evd.config import Config
from evd.core.config import KafkaConfig, LogConfig
from evd.core.log import TopicPartition
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.streams import Stream

PARTITIONS = 8


def pinned(cpu: int | None) -> set[int]:
    """Pin this process to ``cpu`` (children inherit it); the affinity before."""
    own = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return own


def start_pod(
    args: argparse.Namespace, roles: str, cpu: int | None, config: Path, data_dir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
    own = pinned(cpu)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evd", "serve", "--workers", "1", "--port", str(port),
             "--data-dir", str(data_dir), "--config", str(config), "--roles", roles],
            stdout=log, stderr=subprocess.STDOUT,
        )
    finally:
        os.sched_setaffinity(0, own)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            scrape(port)
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"evd serve --roles {roles} did not start")


async def raw_end(bootstrap: str, prefix: str) -> int:
    """Records in the raw topic (the sum of its partitions' end offsets)."""
    cfg = Config(
        log=LogConfig(backend="kafka", partitions=PARTITIONS),
        kafka=KafkaConfig(bootstrap_servers=[bootstrap], topic_prefix=prefix, idempotence=False),
    )
    consumer = KafkaConsumer(cfg, None)
    try:
        consumer.assign(TopicPartition(Stream.RAW, p) for p in range(PARTITIONS))
        return sum((await consumer.end_offsets()).values())
    finally:
        await consumer.close()


def run_rate(args: argparse.Namespace, rate: float, run: int) -> dict[str, Any]:
    prefix = f"bench{run}."
    with tempfile.TemporaryDirectory(prefix="evd-kafka-") as tmp:
        own = pinned(args.broker_cpu)
        try:
            broker = Broker(log_path=Path(args.server_log) if args.server_log else None).start()
        finally:
            os.sched_setaffinity(0, own)
        pods: list[subprocess.Popen[bytes]] = []
        try:
            config = Path(tmp) / "evd.yaml"
            config.write_text(json.dumps({
                "log": {"backend": "kafka", "partitions": PARTITIONS},
                "kafka": {"bootstrap_servers": [broker.bootstrap], "topic_prefix": prefix,
                          "idempotence": False, "linger_ms": args.linger_ms},
                "snapshot": {"dir": str(Path(tmp) / "state")},
            }))
            process_port = None
            if args.process:
                proc, process_port = start_pod(
                    args, "process", args.process_cpu, config, Path(tmp) / "process")
                pods.append(proc)
            edge, edge_port = start_pod(args, "edge", args.edge_cpu, config, Path(tmp) / "edge")
            pods.append(edge)
            before = uvloop.run(raw_end(broker.bootstrap, prefix))
            assert broker.proc is not None
            cpu0 = {"broker": cpu_of(broker.proc.pid), "load": time.process_time()}
            t0 = time.perf_counter()
            samples: list[tuple[float, float, float]] = []
            done = threading.Event()
            sampler = threading.Thread(
                target=sample_processor, args=(process_port, t0, samples, done), daemon=True)
            if process_port is not None:
                sampler.start()
            result = uvloop.run(drive(args, edge_port, rate, edge.pid))
            elapsed = time.perf_counter() - t0
            done.set()
            if process_port is not None:
                sampler.join()
                result.update(processor_summary(args, samples))
            # Whole-run averages (load and settle): what else shared the machine.
            result["broker_cpu_cores"] = round((cpu_of(broker.proc.pid) - cpu0["broker"]) / elapsed, 2)
            result["load_cpu_cores"] = round((time.process_time() - cpu0["load"]) / elapsed, 2)
            records = uvloop.run(raw_end(broker.bootstrap, prefix)) - before
            accepted = result["accepted_at_end_of_load"]
            result["raw_records"] = records
            result["events_per_record"] = round(accepted / records, 1) if records else None
            return result
        finally:
            for pod in pods:
                pod.terminate()
            for pod in pods:
                try:
                    pod.wait(30)
                except subprocess.TimeoutExpired:
                    pod.kill()
            broker.stop()


def cpu_of(pid: int) -> float:
    return sum(tree_cpu(pid).values())


def sample_processor(
    port: int, t0: float, out: list[tuple[float, float, float]], done: threading.Event
) -> None:
    """(seconds since t0, events processed, lag in seconds) of the process pod, twice a second."""
    while not done.wait(0.5):
        m = scrape(port)
        out.append((time.perf_counter() - t0,
                    metrics.total(m, "evd_processor_events_total") or 0.0,
                    metrics.total(m, "evd_processor_lag_seconds_max") or 0.0))


def processor_summary(
    args: argparse.Namespace, samples: list[tuple[float, float, float]]
) -> dict[str, Any]:
    """The processor's events/s in the measured window, its lag at the end of the load,
    and whether it kept up (lag at the end of the load within --lag-bound)."""
    def at(t: float) -> tuple[float, float, float]:
        return min(samples, key=lambda s: abs(s[0] - t))

    start, end = at(args.warmup), at(args.duration)
    rate = (end[1] - start[1]) / max(end[0] - start[0], 1e-9)
    return {
        "processed_per_s": round(rate),
        "processor_lag_seconds_at_end_of_load": end[2],
        "processor_kept_up": end[2] <= args.lag_bound,
        "processed_total": samples[-1][1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="max", help="comma-separated events/s, or max")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--linger-ms", type=int, default=2)
    parser.add_argument("--lag-bound", type=float, default=2.0,
                        help="processor lag (s) at the end of the load that counts as keeping up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--one-user", action="store_true",
                        help="one user per request (a client app's batch): one record per request")
    parser.add_argument("--process", action="store_true", help="run a process pod too")
    parser.add_argument("--edge-cpu", type=int)
    parser.add_argument("--process-cpu", type=int)
    parser.add_argument("--broker-cpu", type=int)
    parser.add_argument("--load-cpu", type=int)
    parser.add_argument("--out", type=Path, default=Path("bench-out/kafka"))
    parser.add_argument("--server-log", type=Path, help="append the pods' and broker's logs here")
    args = parser.parse_args(argv)
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    results = []
    for run, rate in enumerate(0.0 if r == "max" else float(r) for r in args.rates.split(",")):
        r = run_rate(args, rate, run)
        r.pop("samples", None)
        results.append(r)
        line = (
            f"target {'max' if rate <= 0 else f'{rate:,.0f}'} ev/s: into raw "
            f"{r['accepted_per_s']:,} ev/s ({r['raw_records'] / args.duration:,.0f} records/s,"
            f" {r['events_per_record']} events per record), statuses {r['statuses']}, p99 "
            f"{r['p99_ms']:.1f} ms, edge {r['server_cpu_cores']:.2f} cores "
            f"({r['server_cpu_us_per_event'] or 0:.1f} us per event); over the run: broker"
            f" {r['broker_cpu_cores']:.2f} cores, load generator {r['load_cpu_cores']:.2f} cores"
        )
        if args.process:
            line += (
                f"; processor {r['processed_per_s']:,} ev/s, lag at end of load"
                f" {r['processor_lag_seconds_at_end_of_load']:.0f} s"
                f" ({'kept up' if r['processor_kept_up'] else 'fell behind'})"
            )
        print(line, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kafka.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
