"""Per-event costs of the edge's hot path. Run: pytest bench/micro --benchmark-only"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from evd.config import Config
from evd.core.log import Append
from evd.core.log.embedded.framing import frame
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.schema import (
    RawBatch,
    batch_is_valid,
    envelope_decoder,
    msgpack_encoder,
)
from evd.edge.ingest import Ingest, Pending

from .conftest import batch_body

pytestmark = pytest.mark.benchmark(min_rounds=50)


def test_decode_validate_100(benchmark: Any, body100: bytes) -> None:
    """Typed decode of a 100-event body plus the whole-batch checks."""

    def run() -> None:
        events = envelope_decoder.decode(body100).events
        assert batch_is_valid(events)

    benchmark(run)


def test_encode_raw_batch_100(benchmark: Any, body100: bytes) -> None:
    """msgpack encoding of one raw-log record of 100 events."""
    events = envelope_decoder.decode(body100).events
    benchmark(lambda: msgpack_encoder.encode(RawBatch(1, events, 0)))


def test_decode_validate_encode_100(benchmark: Any, body100: bytes) -> None:
    """decode + validate + encode: the issue's per-event micro-benchmark (divide by 100)."""

    def run() -> bytes:
        events = envelope_decoder.decode(body100).events
        assert batch_is_valid(events)
        return msgpack_encoder.encode(RawBatch(1, events, 0))

    benchmark(run)


class _NullLog:
    """A log whose appends are durable at once, to time Ingest.handle alone."""

    partitions = 8
    writable = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done = loop.create_future()
        self.done.set_result(None)

    def append_all(self, records: Sequence[Append]) -> asyncio.Future[None]:
        return self.done


def test_ingest_handle_100(benchmark: Any) -> None:
    """Ingest.handle on 100 new events: decode, validate, dedup, partition, encode."""
    loop = asyncio.new_event_loop()
    try:
        ingest = Ingest(Config(), _NullLog(loop))  # type: ignore[arg-type]
        bodies = [batch_body(100, f"r{i}") for i in range(2000)]
        state = {"i": 0}

        def run() -> None:
            state["i"] = (state["i"] + 1) % len(bodies)
            result = ingest.handle(bodies[state["i"]], None, b"k")
            assert isinstance(result, Pending)

        benchmark(run)
    finally:
        loop.close()


def test_frame_40k(benchmark: Any) -> None:
    """Framing (length + crc32) of a 40 KB record."""
    payload = b"x" * 40_000
    benchmark(frame, payload)


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_log_append_flush(benchmark: Any, tmp_path: Path, fsync: str) -> None:
    """One group commit of 8 partitions x 4 KB records, with and without fsync."""
    loop = asyncio.new_event_loop()
    log = EmbeddedLog(tmp_path, 8, fsync=fsync)  # type: ignore[arg-type]
    log.open()
    payload = b"y" * 4096

    async def once() -> None:
        futs = [log.append("raw", p, payload) for p in range(8)]
        await asyncio.gather(*futs)

    try:
        benchmark(lambda: loop.run_until_complete(once()))
    finally:
        loop.run_until_complete(log.close())
        loop.close()
