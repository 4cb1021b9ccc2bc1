"""Per-record cost of the processor. Run: pytest bench/micro/test_processing.py --benchmark-only

Each round hands the processor the next 100-event raw record of a recorded
stream (bench.processing's traffic, one partition), so dedup, the watermark,
the buffer and the sessions see new events every time, as in a live run.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench.processing import CHART_WINDOW_MS, Recorded, record
from evd.core.config import ProcessingConfig
from evd.core.log import records
from evd.core.log.records import Kind
from evd.core.schema import ChartsBatch, RawBatch, SessionsBatch

processor = pytest.importorskip("evd.state.processor", reason="evd.state.processor not there")

WARMUP = 300
ROUNDS = 1500


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    # Requests of 100 events into one partition: every record holds 100 events.
    return record((WARMUP + ROUNDS) * 100, seed=3, partitions=1)


def _warm(recorded: Recorded) -> tuple[Any, Any, list[RawBatch]]:
    raws = [records.decode(payload, "raw") for _, payload in recorded.records]
    proc = processor.PartitionProcessor(0, ProcessingConfig(), CHART_WINDOW_MS,
                                        now_ms=raws[0].received_at)
    out = processor.Outputs()
    for raw in raws[:WARMUP]:
        proc.process(0, raw, raw.received_at, out)
        out.clear()
    return proc, out, raws[WARMUP:]


def test_process_100(benchmark: Any, recorded: Recorded) -> None:
    """PartitionProcessor.process of one decoded 100-event record (divide by 100)."""
    proc, out, raws = _warm(recorded)
    feed = iter(raws)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        out.clear()
        raw = next(feed)
        return (0, raw, raw.received_at, out), {}

    benchmark.pedantic(proc.process, setup=setup, rounds=ROUNDS, iterations=1)


def test_decode_process_encode_100(benchmark: Any, recorded: Recorded) -> None:
    """What the runner does per 100-event record: decode, process, encode the outputs."""
    proc, out, _ = _warm(recorded)
    payloads = iter([payload for _, payload in recorded.records[WARMUP:]])

    def run(payload: bytes) -> None:
        raw = records.decode(payload, "raw")
        proc.process(0, raw, raw.received_at, out)
        for b in out.events:
            records.encode(Kind.EVENTS, b.received_at, b)
        for b in out.late:
            records.encode(Kind.LATE, b.received_at, b)
        if out.sessions:
            records.encode(Kind.SESSIONS, raw.received_at, SessionsBatch(out.sessions))
        if out.chart_rows or out.closed_until is not None:
            records.encode(Kind.CHARTS, raw.received_at,
                           ChartsBatch(0, out.closed_until or 0, out.chart_rows))
        out.clear()

    benchmark.pedantic(run, setup=lambda: ((next(payloads),), {}), rounds=ROUNDS,
                       iterations=1)
