"""POST /v1/events: decode, validate, enrich, authorize, rate-limit, append.

The common case (every event valid) is one msgspec decode of the whole body into
typed Structs. Only a batch that fails validation is decoded again event by
event, so that each bad event is reported with its index and field path and
written to the ``dead_letter`` stream; the valid events of that batch are
accepted as usual.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from evd.config import Config
from evd.core.errors import EvdError, LogOverloaded, LogUnavailable, explain_validation
from evd.core.log import Append, Producer, partition_for, partitions_for
from evd.core.log import records as rec
from evd.core.log.streams import Stream
from evd.core.metrics.slots import HOT
from evd.core.schema import (
    DeadLetter,
    Event,
    IngestResult,
    RawBatch,
    Rejection,
    batch_is_valid,
    check_event,
    envelope_decoder,
    epoch_ms,
    event_decoder,
    event_id_of,
    json_encoder,
    raw_envelope_decoder,
)
from evd.edge import metrics
from evd.edge.auth import RateLimiter


class Reply(NamedTuple):
    """A response ready to send."""

    status: int
    body: bytes
    retry_after: int = 0


class Pending(NamedTuple):
    """A 200 response to send once ``durable`` completes (503 if it fails)."""

    durable: asyncio.Future[Any]
    reply: Reply
    event_ids: list[str]


class ErrorBody(msgspec.Struct):
    error: str


def error_reply(status: int, message: str, retry_after: int = 0) -> Reply:
    """A JSON ``{"error": message}`` reply."""
    return Reply(status, json_encoder.encode(ErrorBody(message)), retry_after)


class TooLarge(EvdError):
    """The decompressed body exceeds limits.max_decompressed_bytes."""

#: The streams the edge appends to, as plain strings: an enum member's lookup
#: (EnumType has __getattr__) is several times a global's, once per request.
_RAW: str = Stream.RAW.value
_DEAD_LETTER: str = Stream.DEAD_LETTER.value


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body (every member), failing as soon as the output passes ``limit``."""
    out = bytearray()
    data = body
    while True:
        inflater = zlib.decompressobj(wbits=31)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise TooLarge
        # max_length stopped inflation exactly at the limit with input left over.
        if inflater.unconsumed_tail and inflater.decompress(inflater.unconsumed_tail, 1):
            raise TooLarge
        if not inflater.eof:
            raise zlib.error("truncated gzip stream")
        # Concatenated members are one gzip stream (RFC 1952 2.2).
        data = inflater.unused_data
        if not data:
            return bytes(out)


class RecentIds:
    """Event ids accepted recently by this worker, bounded by two generations.

    Remembers at least ``capacity // 2`` and at most ``capacity`` ids; the
    processor's dedup window is the authoritative one, this only lets the edge
    answer ``duplicates`` for client retries without a log round trip.
    """

    def __init__(self, capacity: int) -> None:
        self._half = max(1, capacity // 2)
        self._current: set[str] = set()
        self._previous: set[str] = set()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._current or event_id in self._previous

    def seen_among(self, event_ids: set[str]) -> set[str]:
        """The members of ``event_ids`` seen recently (usually none)."""
        current, previous = self._current, self._previous
        if current.isdisjoint(event_ids) and previous.isdisjoint(event_ids):
            return set()
        return (event_ids & current) | (event_ids & previous)

    def add_all(self, event_ids: list[str]) -> None:
        self._current.update(event_ids)
        if len(self._current) >= self._half:
            self._previous, self._current = self._current, set()


class Ingest:
    """Turns one request body into log appends and the contract's response."""

    def __init__(self, cfg: Config, log: Producer, limiter: RateLimiter | None = None) -> None:
        """``limiter``: the per-key rate limit, this process's own unless given (a
        worker passes one shared with its siblings)."""
        self.log = log
        self.partitions = cfg.log.partitions
        #: Why POSTs are refused with 404 (a server without the edge role), or None.
        self.refusal: str | None = None
        self.max_decompressed = cfg.limits.max_decompressed_bytes
        self.max_events = cfg.limits.max_events_per_batch
        self.skew_threshold_ms = cfg.ingest.clock_skew_threshold_ms
        self.recent = RecentIds(cfg.ingest.edge_dedup_ids)
        self.limiter = limiter or RateLimiter(cfg.limits, keys=len(cfg.auth.keys))

    def shed(self, key: bytes) -> Reply | None:
        """A refusal decided from the headers alone (body unread, undecoded), or None.

        Under a spike this keeps refusing cheap: 429 once the key's bucket is
        empty, 503 while the log is unavailable or its flush queue is full.
        """
        if self.refusal is not None:
            return error_reply(404, self.refusal)
        wait = self.limiter.empty(key) if self.limiter.rate > 0 else 0.0
        if wait:
            return error_reply(429, "rate limit exceeded for this API key", int(wait))
        if not self.log.writable:
            return error_reply(503, "log unavailable", 5)
        if self.log.overloaded:
            return error_reply(
                503, "overloaded: the log's flush queue is full or its disk cap reached", 1
            )
        return None

    def handle(self, body: bytes, encoding: bytes | None, key: bytes) -> Reply | Pending:
        """Process one request body; never raises for bad input."""
        if encoding is not None:
            enc = encoding.strip().lower()
            if enc == b"gzip":
                try:
                    body = gunzip(body, self.max_decompressed)
                except TooLarge:
                    return error_reply(
                        413, f"decompressed body exceeds {self.max_decompressed} bytes"
                    )
                except zlib.error as exc:
                    return error_reply(400, f"body is not valid gzip: {exc}")
            elif enc != b"identity":
                return error_reply(415, "Content-Encoding must be gzip or identity")

        rejected: list[Rejection] = []
        dead: list[DeadLetter] = []
        received_at = time.time_ns() // 1_000_000
        try:
            decoded = self._decode(body, received_at, rejected, dead)
        except RecursionError:
            # Raised inside the decode's own except clauses too, so caught out here.
            return error_reply(400, "body is not an event batch: JSON nested too deeply")
        if isinstance(decoded, Reply):
            return decoded
        events, sent_at = decoded

        n_events = len(events) + len(rejected)
        if n_events > self.max_events:
            return self._too_many(n_events)
        HOT.counts[metrics.RECEIVED.slot] += n_events
        wait = self.limiter.take(key, n_events) if self.limiter.rate > 0 else 0.0
        if wait:
            metrics.REJECTED.inc("rate_limited", n_events)
            return error_reply(429, "rate limit exceeded for this API key", int(wait))

        skew = 0
        if sent_at is not None:
            skew = received_at - epoch_ms(sent_at)
            if -self.skew_threshold_ms <= skew <= self.skew_threshold_ms:
                skew = 0

        by_partition, accepted_ids, duplicates = self._split(events)
        encode = rec.encode
        records: list[Append] = [
            (_RAW, p, encode(rec.Kind.RAW, received_at, RawBatch(received_at, batch, skew)))
            for p, batch in by_partition.items()
        ]
        for letter in dead:
            records.append((
                _DEAD_LETTER,
                partition_for(letter.event.decode(errors="replace"), self.partitions),
                encode(rec.Kind.DEAD_LETTER, received_at, letter),
            ))
        durable: asyncio.Future[Any] | None = None
        try:
            if records:
                durable = self.log.append_all(records)  # all of the request's, or none
        except LogOverloaded as exc:
            metrics.REJECTED.inc("overloaded", n_events)
            return error_reply(503, f"overloaded: {exc}", 1)
        except LogUnavailable as exc:
            metrics.REJECTED.inc("log_unavailable", n_events)
            return error_reply(503, f"log unavailable: {exc}", 5)

        if rejected:
            metrics.REJECTED.inc("invalid", len(rejected))
        if duplicates:
            HOT.counts[metrics.DUPLICATES.slot] += duplicates
        reply = Reply(
            200, json_encoder.encode(IngestResult(len(accepted_ids), duplicates, rejected))
        )
        if durable is None:
            return reply
        return Pending(durable, reply, accepted_ids)

    def _decode(
        self,
        body: bytes,
        received_at: int,
        rejected: list[Rejection],
        dead: list[DeadLetter],
    ) -> tuple[list[Event], datetime | None] | Reply:
        """The valid events of ``body`` and its sent_at, or the reply refusing it.

        Invalid events are added to ``rejected`` and ``dead``.
        """
        try:
            envelope = envelope_decoder.decode(body)
            events = envelope.events
            sent_at = envelope.sent_at
            if not batch_is_valid(events):
                # Typed, but some event breaks a rule its decoder cannot check:
                # find those without decoding the batch again.
                events = self._drop_invalid(body, events, received_at, rejected, dead)
        except msgspec.ValidationError:
            try:
                raw = raw_envelope_decoder.decode(body)
            except msgspec.ValidationError as exc:
                return error_reply(400, f"body is not an event batch: {explain_validation(exc)}")
            except msgspec.DecodeError as exc:
                return error_reply(400, f"body is not valid JSON: {exc}")
            if len(raw.events) > self.max_events:
                return self._too_many(len(raw.events))
            sent_at = raw.sent_at
            events = []
            for index, item in enumerate(raw.events):
                try:
                    event = event_decoder.decode(item)
                    error = check_event(event)
                except msgspec.ValidationError as exc:
                    error = explain_validation(exc)
                if error is None:
                    events.append(event)
                else:
                    rejected.append(Rejection(index, event_id_of(item), error))
                    dead.append(DeadLetter(received_at, index, error, bytes(item)))
        except msgspec.DecodeError as exc:
            return error_reply(400, f"body is not valid JSON: {exc}")
        return events, sent_at

    @staticmethod
    def _drop_invalid(
        body: bytes,
        events: list[Event],
        received_at: int,
        rejected: list[Rejection],
        dead: list[DeadLetter],
    ) -> list[Event]:
        """The events passing check_event; the others are reported and dead-lettered."""
        raws = raw_envelope_decoder.decode(body).events  # the events as sent
        keep = []
        for index, event in enumerate(events):
            error = check_event(event)
            if error is None:
                keep.append(event)
            else:
                rejected.append(Rejection(index, event.event_id, error))
                dead.append(DeadLetter(received_at, index, error, bytes(raws[index])))
        return keep

    def _split(self, events: list[Event]) -> tuple[dict[int, list[Event]], list[str], int]:
        """Drop duplicate ids and group the rest by partition: (groups, ids, duplicates)."""
        ids = [event.event_id for event in events]
        unique = set(ids)
        recent = self.recent
        if len(unique) == len(ids):
            # No repeats inside the batch (the usual case): drop the ids seen in
            # earlier requests with set operations rather than a Python loop.
            seen_before = recent.seen_among(unique)
            if not seen_before:
                keep, duplicates = events, 0
            else:
                keep = [event for event in events if event.event_id not in seen_before]
                ids = [event.event_id for event in keep]
                duplicates = len(events) - len(keep)
        else:
            keep, ids, duplicates = [], [], 0
            seen: set[str] = set()
            for event in events:
                eid = event.event_id
                if eid in seen or eid in recent:
                    duplicates += 1
                else:
                    seen.add(eid)
                    ids.append(eid)
                    keep.append(event)
        partitions = self.partitions
        if partitions == 1:
            return ({0: keep} if keep else {}), ids, duplicates
        groups: dict[int, list[Event]] = {}
        # One partition per event, by construction. No strict=: on this path per
        # request, the keyword is parsed at every call.
        parts = partitions_for([event.user_id for event in keep], partitions)
        for event, p in zip(keep, parts):  # noqa: B905
            group = groups.get(p)
            if group is None:
                groups[p] = [event]
            else:
                group.append(event)
        return groups, ids, duplicates

    def committed(self, pending: Pending) -> None:
        """Called once a Pending's appends are durable."""
        self.recent.add_all(pending.event_ids)
        HOT.counts[metrics.ACCEPTED.slot] += len(pending.event_ids)

    def _too_many(self, n: int) -> Reply:
        metrics.REJECTED.inc("too_many_events", n)
        return error_reply(413, f"{n} events exceed limits.max_events_per_batch={self.max_events}")
