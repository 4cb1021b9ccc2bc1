"""The format of log records: a tag and version in front of every payload.

Every record evd appends starts with a 12-byte header::

    0xC1 'E' | kind (u8) | version (u8) | timestamp ms (i64)     little endian

``0xC1`` is the one byte msgpack never uses, so a record written before
records were tagged (a bare msgpack map, 0x8X) is told apart from a tagged
one and read as version 0 of its stream's kind. ``kind`` names the payload's
schema, ``version`` its revision, so a later evd reads an older log;
``timestamp`` is when the record was produced (the edge's received_at), which
is what consumer lag in seconds is measured against.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import msgspec

from evd.core.errors import LogError
from evd.core.log import Stream
from evd.core.schema import (
    ChartsBatch,
    DeadLetter,
    Event,
    EventsBatch,
    RawBatch,
    SessionsBatch,
)

__all__ = [
    "HEADER",
    "KIND_OF_STREAM",
    "Kind",
    "RecordFormatError",
    "decode",
    "decode_all",
    "decode_raw",
    "encode",
    "encode_events",
    "header_of",
    "timestamp_of",
]

HEADER = struct.Struct("<2sBBq")
MAGIC = b"\xc1E"
_TIMESTAMP = struct.Struct("<q")


class Kind:
    """Payload kinds (one per output schema)."""

    RAW = 1
    DEAD_LETTER = 2
    EVENTS = 3
    LATE = 4
    SESSIONS = 5
    CHARTS = 6


#: The newest version of each kind's schema; what this evd writes.
VERSION = 1

_TYPES: dict[int, type[Any]] = {
    Kind.RAW: RawBatch,
    Kind.DEAD_LETTER: DeadLetter,
    Kind.EVENTS: EventsBatch,
    Kind.LATE: EventsBatch,
    Kind.SESSIONS: SessionsBatch,
    Kind.CHARTS: ChartsBatch,
}
_DECODERS = {kind: msgspec.msgpack.Decoder(t) for kind, t in _TYPES.items()}
_LIST_DECODERS: dict[int, msgspec.msgpack.Decoder[list[Any]]] = {
    kind: msgspec.msgpack.Decoder(list[t]) for kind, t in _TYPES.items()  # type: ignore[valid-type]
}
#: A msgpack array 32 header: 0xDD, the element count (big endian).
_ARRAY32 = struct.Struct(">BI")
#: A record's tag (magic, kind, version) and its body.
_TAG = itemgetter(slice(0, 4))
_BODY = itemgetter(slice(HEADER.size, None))
_ENCODER = msgspec.msgpack.Encoder()
_pack = HEADER.pack
_encode = _ENCODER.encode

#: The kind of an untagged (version 0) record, by the stream it is in.
KIND_OF_STREAM: dict[str, int] = {
    Stream.RAW: Kind.RAW,
    Stream.DEAD_LETTER: Kind.DEAD_LETTER,
    Stream.EVENTS: Kind.EVENTS,
    Stream.LATE: Kind.LATE,
    Stream.SESSIONS: Kind.SESSIONS,
    Stream.CHARTS: Kind.CHARTS,
}


class RecordFormatError(LogError):
    """A record whose tag, kind or version this evd cannot read."""


class Header(NamedTuple):
    kind: int
    version: int
    #: Epoch ms when the record was produced; None for untagged (version 0) records.
    timestamp: int | None
    #: Where the payload starts.
    start: int


def encode(kind: int, timestamp: int, value: object) -> bytes:
    """A tagged record of ``value`` (a Struct of ``kind``'s schema)."""
    # One concatenation: measured faster than encode_into a bytearray and bytes().
    return _pack(MAGIC, kind, VERSION, timestamp) + _encode(value)


def header_of(payload: bytes, stream: str) -> Header:
    """The header of a record of ``stream`` (tagged or version 0)."""
    if payload[:2] == MAGIC:
        if len(payload) < HEADER.size:
            raise RecordFormatError(f"{stream} record of {len(payload)} bytes is shorter than its header")
        _, kind, version, timestamp = HEADER.unpack_from(payload)
        return Header(kind, version, timestamp, HEADER.size)
    kind = KIND_OF_STREAM.get(stream)
    if kind is None:
        raise RecordFormatError(f"untagged record in stream {stream!r}, which never had them")
    return Header(kind, 0, None, 0)


def timestamp_of(payload: bytes) -> int | None:
    """The header's timestamp of a record (None: untagged, version 0): header_of's
    ``timestamp`` without building the header."""
    if payload[:2] == MAGIC and len(payload) >= HEADER.size:
        stamp: int = _TIMESTAMP.unpack_from(payload, 4)[0]
        return stamp
    return None


def decode(payload: bytes, stream: str) -> Any:
    """The Struct a record of ``stream`` holds; RecordFormatError if unreadable."""
    head = header_of(payload, stream)
    if head.version > VERSION:
        raise RecordFormatError(
            f"{stream} record has version {head.version} of kind {head.kind}; this evd reads"
            f" up to {VERSION} (written by a newer evd?)"
        )
    decoder = _DECODERS.get(head.kind)
    if decoder is None:
        raise RecordFormatError(f"{stream} record has unknown kind {head.kind}")
    try:
        return decoder.decode(memoryview(payload)[head.start :])
    except msgspec.DecodeError as exc:
        raise RecordFormatError(f"{stream} record does not decode: {exc}") from None


def join_bodies(payloads: Sequence[bytes]) -> bytes | None:
    """The payloads' bodies as one msgpack array, when they are all tagged records of
    one kind and one version this evd reads (else None): what ``decode_all`` and
    readers of part of a record decode in one call. Each body is one msgpack
    object (as ``encode`` writes it), so the array's elements are the records."""
    first = payloads[0][:4]
    if first[:2] != MAGIC or len(first) < 4 or first[3] > VERSION:
        return None
    # (Every check and copy below iterates in C.)
    if min(map(len, payloads)) < HEADER.size or any(map(first.__ne__, map(_TAG, payloads))):
        return None
    return _ARRAY32.pack(0xDD, len(payloads)) + b"".join(map(_BODY, payloads))


def decode_all(payloads: Sequence[bytes], stream: str) -> list[Any]:
    """``decode`` of each of ``payloads`` (records of ``stream``), in one msgspec call
    when ``join_bodies`` joins them; otherwise, or when that fails, one by one (so
    an unreadable record raises as ``decode`` says)."""
    if len(payloads) > 1 and (body := join_bodies(payloads)) is not None:
        decoder = _LIST_DECODERS.get(payloads[0][2])
        if decoder is not None:
            try:
                values: list[Any] = decoder.decode(body)
            except msgspec.DecodeError:
                pass  # one of them is unreadable: decode() below names it
            else:
                return values
    return [decode(p, stream) for p in payloads]


class _LazyRaw(msgspec.Struct):
    """A RawBatch whose events stay msgpack bytes until decoded on their own."""

    received_at: int
    events: msgspec.Raw
    skew_ms: int = 0


class _EventsRecord(msgspec.Struct, omit_defaults=True):
    """EventsBatch with its events as msgpack bytes: the same fields, in the same
    order, so it encodes to the same bytes as EventsBatch of those events."""

    received_at: int
    events: msgspec.Raw
    skew_ms: int = 0
    late: list[int] = msgspec.field(default_factory=list)
    duplicates: dict[str, int] = msgspec.field(default_factory=dict)
    raw_source: int = -1
    raw_offset: int = -1


_lazy_raw_decoder = msgspec.msgpack.Decoder(_LazyRaw)
_event_list_decoder = msgspec.msgpack.Decoder(list[Event])


def decode_raw(payload: bytes) -> tuple[RawBatch, msgspec.Raw]:
    """A record of the raw stream, and its events array as the msgpack bytes it holds.

    The processor forwards those bytes to the ``events`` stream when it keeps
    every event of the record (encode_events), instead of encoding the events
    again: the usual case, and about a fifth of the processing time.
    """
    head = header_of(payload, Stream.RAW)
    if head.kind != Kind.RAW or head.version > VERSION:
        raise RecordFormatError(
            f"raw record of kind {head.kind} version {head.version}; this evd reads kind"
            f" {Kind.RAW} up to version {VERSION}"
        )
    try:
        lazy = _lazy_raw_decoder.decode(memoryview(payload)[head.start :])
        events = _event_list_decoder.decode(lazy.events)
    except msgspec.DecodeError as exc:
        raise RecordFormatError(f"raw record does not decode: {exc}") from None
    return RawBatch(lazy.received_at, events, lazy.skew_ms), lazy.events


def encode_events(
    kind: int, timestamp: int, batch: EventsBatch, events: msgspec.Raw | None = None
) -> bytes:
    """A tagged record of ``batch``; ``events``: the msgpack bytes of ``batch.events``
    when the caller has them (decode_raw), encoded as they are."""
    if events is None:
        return encode(kind, timestamp, batch)
    return encode(
        kind, timestamp, _EventsRecord(
            batch.received_at, events, batch.skew_ms, batch.late, batch.duplicates,
            batch.raw_source, batch.raw_offset,
        )
    )
