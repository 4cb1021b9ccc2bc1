"""``evd log-read``: the embedded log's records as JSON lines, for people and scripts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from evd.core.embedded import read_partition
from evd.core.log import DEAD_LETTER
from evd.core.schema import dead_letter_decoder, raw_batch_decoder
from evd.core.sublog import writers_of


def iter_stream(data_dir: str | Path, stream: str) -> list[dict[str, Any]]:
    """Every record of ``stream`` decoded: raw events one per item, with their position.

    A partition is read writer by writer (every sub-log, including those of
    writers that no longer run); each item says its ``partition``, ``writer``
    and ``offset`` (within that writer's sub-log).
    """
    root = Path(data_dir) / "log" / stream
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for part_dir in sorted(p for p in root.iterdir() if p.name.isdigit()):
        partition = int(part_dir.name)
        for writer in writers_of(data_dir, stream, partition):
            _read_sublog(data_dir, stream, partition, writer, out)
    return out


def _read_sublog(
    data_dir: str | Path, stream: str, partition: int, writer: int, out: list[dict[str, Any]]
) -> None:
    offset = 0
    while True:
        records = read_partition(data_dir, stream, partition, offset, writer=writer)
        if not records:
            return
        for rec in records:
            if stream == DEAD_LETTER:
                letter = dead_letter_decoder.decode(rec.payload)
                out.append({
                    "partition": partition,
                    "writer": writer,
                    "offset": rec.offset,
                    "received_at": letter.received_at,
                    "index": letter.index,
                    "error": letter.error,
                    "event": msgspec.json.decode(letter.event),
                })
                continue
            batch = raw_batch_decoder.decode(rec.payload)
            for event in batch.events:
                item = msgspec.to_builtins(event)
                item.setdefault("event_type", event.event_type)
                item.update(
                    partition=partition,
                    writer=writer,
                    offset=rec.offset,
                    received_at=batch.received_at,
                    skew_ms=batch.skew_ms,
                )
                out.append(item)
        offset = records[-1].next_offset


def print_stream(data_dir: str, stream: str) -> int:
    """Write every record of ``stream`` to stdout as JSON lines."""
    encoder = msgspec.json.Encoder()
    for item in iter_stream(data_dir, stream):
        sys.stdout.buffer.write(encoder.encode(item) + b"\n")
    return 0
