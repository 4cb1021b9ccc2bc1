"""Event schema and codecs.

The edge decodes a request body straight into typed Structs with one reusable
decoder; constraints (ids, track URIs, ranges, ISO country codes) are enforced by
msgspec in C. Only when a batch fails validation does the edge fall back to
decoding each event on its own, to report every bad event by index and field path.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

EventType = Literal["play", "pause", "resume", "seek", "skip", "end"]
EVENT_TYPES: tuple[str, ...] = ("play", "pause", "resume", "seek", "skip", "end")

EventId = Annotated[str, Meta(min_length=1, max_length=64)]
UserId = Annotated[str, Meta(min_length=1, max_length=128)]
# Track ids, countries and position <= duration are checked by check_event
# rather than Meta(pattern=...) or a validation hook in the Struct: msgspec runs
# patterns through Python's re, and a hook runs inside the decoder; both cost more
# per event than check_event after decoding (docs/performance.md).
# Event structs are gc=False: they hold only strings, ints and other such
# structs, so they cannot form cycles, and untracked they cost the GC nothing.
TRACK_PREFIX = "spotify:track:"
TrackId = Annotated[str, Meta(min_length=36, max_length=36)]
Country = Annotated[str, Meta(min_length=2, max_length=2)]

#: ISO 3166-1 alpha-2 codes (officially assigned, plus XK, widely used for Kosovo).
COUNTRIES = frozenset(
    ["AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW"]
)
ShortText = Annotated[str, Meta(max_length=256)]
NonNegativeMs = Annotated[int, Meta(ge=0)]
PositiveMs = Annotated[int, Meta(gt=0)]
AwareTime = Annotated[datetime, Meta(tz=True)]


class Context(msgspec.Struct, omit_defaults=True, gc=False):
    """Where in the app the event happened."""

    page_uri: ShortText | None = None
    playlist_uri: ShortText | None = None


class Playback(msgspec.Struct, omit_defaults=True, gc=False):
    """Playback position of the track when the event happened."""

    position_ms: NonNegativeMs
    duration_ms: PositiveMs
    initiator: ShortText | None = None


class Device(msgspec.Struct, omit_defaults=True, gc=False):
    """The client that sent the event."""

    os: ShortText | None = None
    client_version: ShortText | None = None


class Geo(msgspec.Struct, omit_defaults=True, gc=False):
    """Where the listener is (ISO 3166-1 alpha-2 country)."""

    country: Country
    region: ShortText | None = None


class Event(msgspec.Struct, omit_defaults=True, gc=False):
    """One client event. A missing ``event_type`` means ``play`` (the seed event).

    Decoding checks types and ranges; ``check_event`` checks the rest.
    """

    event_id: EventId
    timestamp: AwareTime
    user_id: UserId
    track_id: TrackId
    playback: Playback
    event_type: EventType = "play"
    context: Context | None = None
    device: Device | None = None
    geo: Geo | None = None


def check_event(event: Event) -> str | None:
    """The first rule ``event`` breaks that its decoder cannot check, as "path: reason"."""
    tid = event.track_id
    if not (tid.startswith(TRACK_PREFIX) and tid.isascii() and tid[14:].isalnum()):
        return "track_id: expected 'spotify:track:' + 22 base62 characters"
    pb = event.playback
    if pb.position_ms > pb.duration_ms:
        return "playback.position_ms: must be <= playback.duration_ms"
    geo = event.geo
    if geo is not None and geo.country not in COUNTRIES:
        return "geo.country: expected an ISO 3166-1 alpha-2 code"
    return None


def batch_is_valid(events: list[Event]) -> bool:
    """True when ``check_event`` passes for every event (the usual case)."""
    # A plain loop: whole-batch tricks (map/join/set over the batch) measured
    # slower (docs/performance.md).
    return not any(map(check_event, events))


class Envelope(msgspec.Struct):
    """A request body whose events are all valid."""

    events: list[Event]
    sent_at: AwareTime | None = None


class RawEnvelope(msgspec.Struct):
    """A request body decoded loosely, to validate each event on its own."""

    events: list[msgspec.Raw]
    sent_at: AwareTime | None = None


class RawBatch(msgspec.Struct, omit_defaults=True):
    """One record of the raw log: the events of one request for one partition.

    Enrichment is per request, so it is stored once per record: ``received_at``
    (epoch ms at the edge) and ``skew_ms`` (received_at - sent_at when the client
    clock is off by more than the threshold, else 0). An event's corrected time
    is ``timestamp + skew_ms``; the original timestamp is kept as sent.
    """

    received_at: int
    events: list[Event]
    skew_ms: int = 0


class DeadLetter(msgspec.Struct):
    """An item rejected, with why and where; written to the ``dead_letter`` stream.

    The edge writes the events it rejects (``stage="edge"``, ``index`` in the
    request); a sink writes the items of a batch it gave up on
    (``stage="sink:<name>"``, ``stream`` the items came from, ``index`` -1).
    """

    received_at: int
    index: int
    error: str
    #: The item as JSON text (an event exactly as the client sent it).
    event: bytes
    stage: str = "edge"
    stream: str = "raw"


class Rejection(msgspec.Struct):
    """One rejected event in a 200 response."""

    index: int
    event_id: str | None
    error: str


class IngestResult(msgspec.Struct):
    """The 200 response of ``POST /v1/events``."""

    accepted: int
    duplicates: int
    rejected: list[Rejection]


envelope_decoder = msgspec.json.Decoder(Envelope)
raw_envelope_decoder = msgspec.json.Decoder(RawEnvelope)
event_decoder = msgspec.json.Decoder(Event)
raw_batch_decoder = msgspec.msgpack.Decoder(RawBatch)
dead_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)
msgpack_encoder = msgspec.msgpack.Encoder()
json_encoder = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    event_id: str | None = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def event_id_of(raw: bytes | msgspec.Raw) -> str | None:
    """Best-effort ``event_id`` of an invalid event, for the rejection report."""
    try:
        return _id_decoder.decode(raw).event_id
    except msgspec.DecodeError:
        return None


def epoch_ms(dt: datetime) -> int:
    """Integer epoch milliseconds of an aware datetime."""
    return int(dt.timestamp() * 1000)


# -- output streams of the processor (evd.state) ---------------------------------


class EventsBatch(msgspec.Struct, omit_defaults=True):
    """One record of the ``events`` (or ``late``) stream: deduplicated events of one
    raw record, enriched as in RawBatch, with the indexes of the late ones.

    An event's time in the pipeline is ``epoch_ms(timestamp) + skew_ms``.
    """

    received_at: int
    events: list[Event]
    skew_ms: int = 0
    #: Indexes into ``events`` of the late events (older than watermark - lateness).
    late: list[int] = msgspec.field(default_factory=list)
    #: Events of the raw record the processor dropped as duplicates, per event
    #: type (the audit's "duplicate" count; a record may hold only these).
    duplicates: dict[str, int] = msgspec.field(default_factory=dict)
    #: The raw record this came from: its writer (sub-log source) and offset.
    #: A processor replaying after a crash emits the same records again; a
    #: consumer that remembers the newest raw offset per (partition, source)
    #: skips them (evd.sinks.delivery). -1: unknown (records of older versions).
    raw_source: int = -1
    raw_offset: int = -1


EndedBy = Literal["play", "skip", "end", "session_close"]


class Play(msgspec.Struct, gc=False):
    """One play of a session: a ``play`` event and the listening it led to."""

    track_id: str
    started_at: int
    listened_ms: int
    ended_by: EndedBy


class Session(msgspec.Struct):
    """A closed listening session (the ``sessions`` stream; ARCHITECTURE.md).

    ``revision``: 0 when first emitted; a late event (within the allowed
    lateness) that changes the session emits it again, same id, revision + 1.
    ``retracted``: the session no longer exists (a late event preceded its first
    event or merged it into another); its last revision, carrying the content it
    had. Readers keep the highest revision per id and skip retracted ones.
    """

    session_id: str
    user_id: str
    started_at: int
    ended_at: int
    event_count: int
    play_count: int
    stream_count: int
    listened_ms: int
    country: str | None
    os: str | None
    plays: list[Play]
    revision: int = 0
    retracted: bool = False


class SessionsBatch(msgspec.Struct):
    """One record of the ``sessions`` stream.

    ``complete_until``: when set, every session of this partition that started
    before it has been emitted (in this record or earlier) in its final revision:
    no late event within the allowed lateness can change or add one. The lake
    marks an hour of sessions complete by it. A record may carry only this.
    """

    sessions: list[Session]
    complete_until: int | None = None


class ChartRow(msgspec.Struct, gc=False):
    """Plays of one track in one closed window of one partition; the id is
    (window_start, country, track_id, partition). ``country`` None: no geo.
    ``revision``: 0 when the window closed (or, for a key a late play added to a
    closed window, when first emitted), + 1 for each late play that changed it."""

    window_start: int
    country: str | None
    track_id: str
    plays: int
    revision: int = 0


class ChartsBatch(msgspec.Struct):
    """One record of the ``charts`` stream: windows of ``partition`` that closed.

    ``closed_until``: every window of this partition ending at or before it is
    closed and already emitted (rows of a window with no plays: none), so a
    record with no rows still tells readers that time moved on. Rows may be
    revisions of windows closed earlier (late plays). ``final_until``: every
    window ending at or before it is final (past the allowed lateness: no
    revision can follow); None in records that do not move it.
    """

    partition: int
    closed_until: int
    rows: list[ChartRow]
    final_until: int | None = None
