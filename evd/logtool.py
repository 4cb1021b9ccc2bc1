"""``evd log-read``: the embedded log's records as JSON lines, for people and scripts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from evd.core.log import records as rec
from evd.core.log.embedded.layout import read_partition
from evd.core.log.embedded.sublog import writers_of
from evd.core.schema import ChartsBatch, DeadLetter, EventsBatch, RawBatch, SessionsBatch


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
        for record in records:
            where = {"partition": partition, "writer": writer, "offset": record.offset}
            out.extend(_items(rec.decode(record.payload, stream), where))
        offset = records[-1].next_offset


def _items(value: object, where: dict[str, Any]) -> list[dict[str, Any]]:
    """One record's items: events one by one, sessions, chart rows, dead letters."""
    if isinstance(value, DeadLetter):
        return [{
            **where,
            "received_at": value.received_at,
            "index": value.index,
            "error": value.error,
            "stage": value.stage,
            "stream": value.stream,
            "event": msgspec.json.decode(value.event),
        }]
    if isinstance(value, RawBatch | EventsBatch):
        late = set(value.late) if isinstance(value, EventsBatch) else set()
        items = []
        for i, event in enumerate(value.events):
            item = msgspec.to_builtins(event)
            item.setdefault("event_type", event.event_type)
            item.update(where, received_at=value.received_at, skew_ms=value.skew_ms)
            if isinstance(value, EventsBatch):
                item["late"] = i in late
            items.append(item)
        return items
    if isinstance(value, SessionsBatch):
        return [{**msgspec.to_builtins(s), **where} for s in value.sessions]
    if isinstance(value, ChartsBatch):
        rows = [
            {**msgspec.to_builtins(r), **where, "closed_until": value.closed_until}
            for r in value.rows
        ]
        return rows or [{**where, "closed_until": value.closed_until}]
    raise TypeError(f"no items for {type(value).__name__}")


def print_stream(data_dir: str, stream: str) -> int:
    """Write every record of ``stream`` to stdout as JSON lines."""
    encoder = msgspec.json.Encoder()
    for item in iter_stream(data_dir, stream):
        sys.stdout.buffer.write(encoder.encode(item) + b"\n")
    return 0
