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
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import msgspec

from evd.core.config import EVENT_TYPES
from evd.core.log import Stream, records
from evd.core.schema import DeadLetter
from evd.sinks import metrics, rows
from evd.sinks.base import Batch, Sink

__all__ = ["AUDIT_STAGE", "AUDIT_STREAMS", "AuditEvents", "AuditStage"]

AUDIT_STAGE = "audit"
AUDIT_STREAMS: list[str] = [Stream.RAW, Stream.DEAD_LETTER, Stream.EVENTS]


# The audit's values are never in a reference cycle and wait in its pending batch
# for up to a second: untracked by the garbage collector (gc=False, tuples).
class _Typed(msgspec.Struct, gc=False):
    event_type: str = "play"


class _RawTypes(msgspec.Struct, gc=False):
    received_at: int
    events: tuple[_Typed, ...]


class _EventsHead(msgspec.Struct, gc=False):
    """An events record as the audit reads it: its events stay msgpack bytes."""

    received_at: int
    events: msgspec.Raw
    skew_ms: int = 0
    late: tuple[int, ...] = ()
    duplicates: dict[str, int] = msgspec.field(default_factory=dict)
    raw_source: int = -1
    raw_offset: int = -1


class AuditEvents(msgspec.Struct, gc=False):
    """What the audit takes of an ``events`` record: what it counts (duplicates per
    type, the types of the late events) and what the delivery loop reads of any
    events record (``events``: one index per event, for the item count;
    ``raw_source``/``raw_offset``). The events themselves are decoded only when
    some are late (their types are counted)."""

    received_at: int
    events: range
    late_types: tuple[str, ...]
    duplicates: dict[str, int]
    raw_source: int
    raw_offset: int


_raw_decoder = msgspec.msgpack.Decoder(_RawTypes)
_head_decoder = msgspec.msgpack.Decoder(_EventsHead)
_raw_list_decoder = msgspec.msgpack.Decoder(list[_RawTypes])
_head_list_decoder = msgspec.msgpack.Decoder(list[_EventsHead])
_types_decoder = msgspec.msgpack.Decoder(list[_Typed])
_dead_decoder = msgspec.msgpack.Decoder(DeadLetter)
_typed_json = msgspec.json.Decoder(_Typed)
_event_type = attrgetter("event_type")
_MAGIC = records.MAGIC
_HEADER_SIZE = records.HEADER.size


def _array_len(array: msgspec.Raw) -> int:
    """The length of a msgpack array from its first bytes (fixarray, array 16, array 32)."""
    head = memoryview(array)
    first = head[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC:
        return int.from_bytes(head[1:3], "big")
    if first == 0xDD:
        return int.from_bytes(head[1:5], "big")
    raise records.RecordFormatError(f"events of an events record are not an array ({first:#x})")


def _events_value(head: _EventsHead) -> AuditEvents:
    late: tuple[str, ...] = ()
    if head.late:
        types = _types_decoder.decode(head.events)
        late = tuple(types[i].event_type for i in head.late)
    return AuditEvents(
        head.received_at, range(_array_len(head.events)), late, head.duplicates,
        head.raw_source, head.raw_offset,
    )


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
        if payload[:2] == _MAGIC and len(payload) >= _HEADER_SIZE:
            body = memoryview(payload)[_HEADER_SIZE:]
        else:
            body = memoryview(payload)[records.header_of(payload, stream).start :]
        if stream == Stream.RAW:
            return _raw_decoder.decode(body)
        if stream == Stream.EVENTS:
            return _events_value(_head_decoder.decode(body))
        return _dead_decoder.decode(body)

    def decode_all(self, stream: str, payloads: Sequence[bytes]) -> list[Any]:
        """``decode`` of each, the raw and events records fetched together in one call."""
        if len(payloads) > 1 and stream in (Stream.RAW, Stream.EVENTS):
            body = records.join_bodies(payloads)
            if body is not None:
                try:
                    if stream == Stream.RAW:
                        raws: list[Any] = _raw_list_decoder.decode(body)
                        return raws
                    return [_events_value(head) for head in _head_list_decoder.decode(body)]
                except msgspec.DecodeError:
                    pass  # one of them is unreadable: decode() names it
        return [self.decode(stream, p) for p in payloads]

    async def write(self, batch: Batch) -> None:
        return None

    def counts(self, batch: Batch) -> Counter[tuple[int, str, str, str]]:
        out: Counter[tuple[int, str, str, str]] = Counter()
        if batch.stream == Stream.RAW:
            # The events of each hour together, counted by type in one C loop each.
            by_hour: dict[int, list[_Typed]] = {}
            for r in batch.values:
                hour = rows.hour_of(r.received_at)
                events = by_hour.get(hour)
                if events is None:
                    by_hour[hour] = list(r.events)
                else:
                    events.extend(r.events)
            accepted = 0
            for hour, events in by_hour.items():
                accepted += len(events)
                for t, n in Counter(map(_event_type, events)).items():
                    out[hour, Stream.EVENTS, t, "accepted"] += n
            metrics.AUDIT_ROWS.inc(accepted)
        elif batch.stream == Stream.EVENTS:
            for b in batch.values:
                if b.duplicates or b.late_types:
                    hour = rows.hour_of(b.received_at)
                    for t, n in b.duplicates.items():
                        out[hour, Stream.EVENTS, t, "duplicate"] += n
                    for t in b.late_types:
                        out[hour, Stream.EVENTS, t, "late"] += 1
        else:
            for d in batch.values:
                if d.stage == "edge":
                    hour = rows.hour_of(d.received_at)
                    out[hour, Stream.EVENTS, _type_of_rejected(d.event), "rejected"] += 1
        return out
