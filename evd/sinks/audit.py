"""The loss audit: counts of what the edge accepted and rejected and what the
processors dropped, beside what every sink delivered, per hour and event type.

The ``audit`` stage runs like a sink (a delivery loop of its own, with its own
offsets in the ledger) over the worker's partitions of ``raw`` (accepted),
``dead_letter`` (rejected at the edge) and ``events`` (the processors'
duplicates and late events); it writes nothing. Sinks count ``delivered``,
``dead_lettered`` and ``filtered`` in the same ledger (evd.sinks.ledger), so
``evd audit`` reads one file, whatever the worker count and across restarts.

For every hour, event type and sink that takes the ``events`` stream:

    accepted - duplicate == delivered + dead_lettered + filtered

or the hour is flagged. Hours are UTC by ``received_at`` (when the edge took
the request). An hour whose events are still on their way (the pipeline's lag)
reads as a discrepancy until they arrive: run it once the pipeline settled, or
look at the hours before the last few minutes.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from evd.core.config import EVENT_TYPES
from evd.core.log import Stream, records
from evd.core.schema import DeadLetter
from evd.sinks import rows
from evd.sinks.base import Batch, Sink
from evd.sinks.ledger import read_counts, read_stages

__all__ = ["AUDIT_STAGE", "AUDIT_STREAMS", "AuditStage", "Report", "report"]

AUDIT_STAGE = "audit"
AUDIT_STREAMS: list[str] = [Stream.RAW, Stream.DEAD_LETTER, Stream.EVENTS]


class _Typed(msgspec.Struct):
    event_type: str = "play"


class _RawTypes(msgspec.Struct):
    received_at: int
    events: list[_Typed]


class _EventsTypes(msgspec.Struct):
    received_at: int
    events: list[_Typed]
    late: list[int] = msgspec.field(default_factory=list)
    duplicates: dict[str, int] = msgspec.field(default_factory=dict)
    raw_source: int = -1
    raw_offset: int = -1


_raw_decoder = msgspec.msgpack.Decoder(_RawTypes)
_events_decoder = msgspec.msgpack.Decoder(_EventsTypes)
_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)
_typed_json = msgspec.json.Decoder(_Typed)


def _type_of_rejected(event: bytes) -> str:
    """The event type of a rejected event as the client sent it ("invalid": none we know)."""
    try:
        t = _typed_json.decode(event).event_type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "invalid"
    return t if t in EVENT_TYPES else "invalid"


class AuditStage(Sink):
    """Counts what the edge and the processors did; delivers nothing."""

    streams = (Stream.RAW, Stream.DEAD_LETTER, Stream.EVENTS)

    def decode(self, stream: str, payload: bytes) -> Any:
        start = records.header_of(payload, stream).start
        body = memoryview(payload)[start:]
        if stream == Stream.RAW:
            return _raw_decoder.decode(body)
        if stream == Stream.EVENTS:
            return _events_decoder.decode(body)
        return _dead_decoder.decode(body)

    async def write(self, batch: Batch) -> None:
        return None

    def counts(self, batch: Batch) -> Counter[tuple[int, str, str, str]]:
        out: Counter[tuple[int, str, str, str]] = Counter()
        if batch.stream == Stream.RAW:
            for b in batch.values:
                hour = rows.hour_of(b.received_at)
                for ev in b.events:
                    out[hour, Stream.EVENTS, ev.event_type, "accepted"] += 1
        elif batch.stream == Stream.EVENTS:
            for b in batch.values:
                hour = rows.hour_of(b.received_at)
                for t, n in b.duplicates.items():
                    out[hour, Stream.EVENTS, t, "duplicate"] += n
                for i in b.late:
                    out[hour, Stream.EVENTS, b.events[i].event_type, "late"] += 1
        else:
            for d in batch.values:
                if d.stage == "edge":
                    hour = rows.hour_of(d.received_at)
                    out[hour, Stream.EVENTS, _type_of_rejected(d.event), "rejected"] += 1
        return out


class Report(msgspec.Struct):
    """One row of ``evd audit``: an hour and event type of the events stream."""

    hour: str
    event_type: str
    accepted: int
    rejected: int
    duplicate: int
    late: int
    #: sink -> {"delivered", "dead_lettered", "filtered"}
    sinks: dict[str, dict[str, int]]
    #: Sinks whose counts do not add up to accepted - duplicate.
    discrepancies: list[str]


def hour_text(hour_ms: int) -> str:
    return datetime.fromtimestamp(hour_ms / 1000, UTC).strftime("%Y-%m-%dT%H")


def parse_hour(text: str) -> int:
    """``2026-12-01T10`` (or ``2026-12-01T10:00``, ``2026-12-01 10``) -> the hour's epoch ms."""
    cleaned = text.strip().replace(" ", "T").rstrip("Z")
    for fmt in ("%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            dt = datetime.strptime(cleaned, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return rows.hour_of(int(dt.timestamp() * 1000))
    raise ValueError(f"--hour {text!r}: expected YYYY-MM-DDTHH (UTC)")


def report(data_dir: str | Path, hour: int | None = None) -> list[Report]:
    """The audit of every hour (or one) and event type of the events stream."""
    stages = read_stages(data_dir)
    event_sinks = {
        name: types for name, (kind, streams, types) in stages.items()
        if kind == "sink" and Stream.EVENTS in streams
    }
    table: dict[tuple[int, str], Counter[tuple[str, str]]] = {}
    for h, stream, event_type, stage, metric, n in read_counts(data_dir, hour):
        if stream != Stream.EVENTS:
            continue
        table.setdefault((h, event_type), Counter())[stage, metric] += n
    out = []
    for (h, event_type), c in sorted(table.items()):
        accepted = c[AUDIT_STAGE, "accepted"]
        duplicate = c[AUDIT_STAGE, "duplicate"]
        sinks = {
            name: {m: c[name, m] for m in ("delivered", "dead_lettered", "filtered")}
            for name in sorted(event_sinks)
        }
        wrong = [
            name for name, got in sinks.items()
            if sum(got.values()) != accepted - duplicate
        ]
        out.append(Report(
            hour=hour_text(h), event_type=event_type, accepted=accepted,
            rejected=c[AUDIT_STAGE, "rejected"], duplicate=duplicate, late=c[AUDIT_STAGE, "late"],
            sinks=sinks, discrepancies=wrong,
        ))
    return out


def render(reports: list[Report]) -> str:
    """The report as a text table; flagged rows end with ``<- DIFFERS: sink, ...``."""
    if not reports:
        return "no audit counts yet (nothing accepted, or the pipeline has not counted it)\n"
    sinks = sorted({s for r in reports for s in r.sinks})
    head = ["hour (UTC)", "event_type", "accepted", "rejected", "duplicate", "late"]
    head += [f"{s}:delivered" for s in sinks]
    lines = [head]
    for r in reports:
        row = [r.hour, r.event_type, str(r.accepted), str(r.rejected), str(r.duplicate), str(r.late)]
        for s in sinks:
            got = r.sinks.get(s, {})
            cell = str(got.get("delivered", 0))
            extra = got.get("dead_lettered", 0), got.get("filtered", 0)
            if any(extra):
                cell += f" (+{extra[0]} dead, +{extra[1]} filtered)"
            row.append(cell)
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = []
    flags = [""] + [
        "  <- DIFFERS: " + ", ".join(r.discrepancies) if r.discrepancies else ""
        for r in reports
    ]
    for line, flag in zip(lines, flags, strict=True):
        cells = "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        text.append(cells + flag)
    flagged = sum(1 for r in reports if r.discrepancies)
    text.append(
        f"{flagged} hour/event type row(s) where accepted - duplicate != delivered + dead-lettered"
        " + filtered" if flagged else "every hour adds up: accepted - duplicate = delivered"
        " + dead-lettered + filtered, for every sink of the events stream"
    )
    return "\n".join(text) + "\n"
