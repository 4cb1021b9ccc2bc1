"""The audit stage: it counts what the edge accepted and rejected and what the
processors dropped (a sink counts what it delivered).

The ``audit`` stage runs like a sink (a delivery loop of its own, with its own
offsets in the ledger) over the worker's partitions of ``raw`` (accepted),
``dead_letter`` (rejected at the edge) and ``events`` (the processors'
duplicates and late events); it writes nothing. Sinks count ``delivered``,
``dead_lettered`` and ``filtered`` in the same ledger (evd.sinks.audit.ledger), so
``evd audit`` reads one file, whatever the worker count and across restarts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec

from evd.core.config import EVENT_TYPES
from evd.core.log import Stream, records
from evd.core.schema import DeadLetter
from evd.sinks import rows
from evd.sinks.base import Batch, Sink

__all__ = ["AUDIT_STAGE", "AUDIT_STREAMS", "AuditStage"]

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
