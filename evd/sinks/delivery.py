"""The delivery loop: one per sink per worker, the same for every sink.

It consumes the sink's streams (the worker's partitions of them) with the
sink's own offsets, decodes and filters records, and gathers one pending batch
per stream. A batch is written when it reaches ``batch.max_events`` items or
``batch.max_bytes`` log bytes, or when its oldest record has waited
``batch.max_age_s``. A failed write is retried with exponential back-off and
full jitter (or after the target's ``Retry-After``) up to
``retry.max_attempts`` writes; then, or at once for a PermanentSinkError, its
items go to the ``dead_letter`` stream with the error, and the loop moves on.

After a write is confirmed (or dead-lettered), the loop commits the audit
ledger (counts + offsets, one transaction; evd.sinks.audit.ledger). A crash
between the write and the ledger makes the batch be written again after a
restart (sinks are idempotent or say what duplicates they allow) but never
counted twice. On restart the loop resumes from the ledger's offsets. The
consumer offsets, which only register the sink for log retention (and tell the
lake's completeness check what it delivered), follow the ledger's: at most
every CONSUMER_COMMIT_S, and when the loop stops; so retention frees a
segment at most that much later than the ledger allows.

The loops of one worker share their decodes (evd.sinks.decoded): a record of a
stream that several sinks take is decoded once, whichever loop reads it first.
After each fetch a loop yields to the event loop, so no loop (nor the edge)
waits for another's whole backlog.

Fetches: a loop that has read its streams to the end and gathers a batch
fetches again at most every FETCH_INTERVAL_S, so records that arrive one by one
(single-event requests) are taken a fetch's worth at a time, not one per wake-up.

Bounds: at most one pending batch per stream, each at most ``max_events`` /
``max_bytes`` plus one record; nothing is fetched while a batch is being written, so
a slow or failing sink only slows its own loop (its lag grows in the log, on
disk, which retention keeps for it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from evd.core.config import BatchConfig, RetryConfig
from evd.core.log import Consumer, ConsumerRecord, Producer, SubLog, TopicPartition, records
from evd.core.log.streams import Stream
from evd.core.schema import DeadLetter
from evd.sinks import metrics, rows
from evd.sinks.audit.ledger import CountKey, Ledger, SeenKey
from evd.sinks.base import Batch, Sink
from evd.sinks.decoded import DecodedRecords

__all__ = ["CONSUMER_COMMIT_S", "FETCH_BYTES", "FETCH_INTERVAL_S", "DeliveryLoop"]

log = logging.getLogger(__name__)

#: Log bytes one fetch reads at most: what a pending batch may overshoot its bound by.
FETCH_BYTES = 1 << 20
#: Longest wait for data when nothing is pending (bounds how late a stop is seen).
IDLE_WAIT_S = 0.5
#: How often the lag gauges are published.
LAG_INTERVAL_S = 1.0
#: A Retry-After longer than this is cut to it (a target cannot park a sink for hours).
MAX_RETRY_AFTER_S = 300.0
#: Longest time the consumer offsets lag the ledger's (how much later retention may free).
CONSUMER_COMMIT_S = 5.0
#: While a batch gathers and the loop has read its streams to the end, it fetches at
#: most this often: what arrived meanwhile comes in one fetch (records wait in the
#: log up to this much more before their batch's age starts).
FETCH_INTERVAL_S = 0.1

_EVENT_STREAMS = rows.EVENT_STREAMS
#: (stream, partition, raw source): SeenKey's fields as a plain tuple (equal, same hash).
_Seen = tuple[str, int, int]


class _Pending:
    """What one stream gathered since its last write."""

    __slots__ = (
        "count", "filtered", "nbytes", "offsets", "partitions", "seen", "since", "stamps",
        "values",
    )

    def __init__(self, now: float) -> None:
        self.values: list[Any] = []
        self.partitions: list[int] = []
        self.count = 0
        self.nbytes = 0
        #: Next offset per sub-log once this batch is written.
        self.offsets: dict[SubLog, int] = {}
        #: Newest raw offsets taken (events/late), committed with the offsets.
        self.seen: dict[_Seen, int] = {}
        #: Events dropped by the sink's event_types, per (hour, event type).
        self.filtered: Counter[tuple[int, str]] = Counter()
        #: (record timestamp ms, items) for the delay histogram.
        self.stamps: list[tuple[int, int]] = []
        self.since = now


class DeliveryLoop:
    """Feeds one sink from its streams; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        sink: Sink,
        consumer: Consumer,
        producer: Producer | None,
        ledger: Ledger,
        streams: list[str],
        partitions: list[int],
        batch: BatchConfig,
        retry: RetryConfig,
        event_types: list[str] | None = None,
        sink_metrics: metrics.SinkMetrics | None = None,
        kind: str = "sink",
        raw_ends: Callable[[], Awaitable[dict[SubLog, int]]] | None = None,
        decoded: DecodedRecords | None = None,
    ) -> None:
        self.name = name
        self.sink = sink
        self.consumer = consumer
        self.producer = producer
        self.ledger = ledger
        self.streams = list(streams)
        self.partitions = list(partitions)
        self.batch = batch
        self.retry = retry
        self.event_types = None if event_types is None else frozenset(event_types)
        self.metrics = sink_metrics
        self.kind = kind
        #: The raw log's end offsets (of this loop's partitions), read at start.
        self.raw_ends = raw_ends
        #: The worker's shared decodes (None: this loop decodes every record itself).
        self.decoded = decoded
        self._decode_all = sink.decode_all
        self._pending: dict[str, _Pending] = {}
        #: The batch being written (and retried): still lag until it is confirmed.
        self._writing: _Pending | None = None
        self._seen: dict[_Seen, int] = {}
        #: When the last fetch returned, and whether it left the log read to its end.
        self._fetched_at = 0.0
        self._caught_up = False
        #: Offsets the ledger holds and the consumer has not committed yet.
        self._uncommitted: dict[SubLog, int] = {}
        self._committed_at = time.monotonic()
        self._stopping = asyncio.Event()
        self._started = False
        self._lag_at = 0.0
        #: Items written, retried, dead-lettered (also in the metrics; for tests and logs).
        self.delivered = 0
        self.retries = 0
        self.dead_lettered = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Register with the ledger, resume from its offsets, start the sink."""
        await self.ledger.register(self.name, self.kind, self.streams, self._types_list())
        self.consumer.assign(
            TopicPartition(stream, p) for stream in self.streams for p in self.partitions
        )
        await self.consumer.register()
        offsets, seen = await self.ledger.offsets(self.name)
        mine = {(s, p) for s in self.streams for p in self.partitions}
        start = dict(self.consumer.positions())
        start.update((s, o) for s, o in offsets.items() if (s.stream, s.partition) in mine)
        ends = await self.consumer.end_offsets()
        for sublog, offset in sorted(start.items()):
            end = ends.get(sublog)
            if end is None:
                continue
            if offset > end:
                # The log lost records this sink already took (fsync never or
                # interval, then a power cut): appends go on from the end.
                log.error(
                    "sink %s: delivered %s up to %d, but it ends at %d (records lost after"
                    " they were delivered); reading on from its end",
                    self.name, sublog, offset, end,
                )
                offset = end
            self.consumer.seek(sublog, offset)
        self._seen = {
            (k.stream, k.partition, k.raw_source): v for k, v in seen.items()
            if (k.stream, k.partition) in mine
        }
        if self._seen and self.raw_ends is not None:
            raw_ends = await self.raw_ends()
            for key, raw_offset in self._seen.items():
                _, partition, raw_source = key
                end = raw_ends.get(SubLog(Stream.RAW, partition, raw_source))
                if end is not None and raw_offset >= end:
                    # The raw log lost records the processor had processed; the raw
                    # offsets from its end on belong to new records, never replays.
                    self._seen[key] = end - 1
        await self.sink.start()
        self._started = True

    def _types_list(self) -> list[str] | None:
        return None if self.event_types is None else sorted(self.event_types)

    def stop(self) -> None:
        """Ask run() to write what it gathered and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Deliver until stop(); then write the pending batches and close the sink."""
        if not self._started:
            await self.start()
        try:
            while not self._stopping.is_set():
                await self.step()
            for stream in list(self._pending):
                await self._deliver(stream)
            await self._commit_consumer()
            await self.sink.flush()
        finally:
            await self.sink.close()

    # -- one pass -------------------------------------------------------------------

    async def step(self) -> None:
        """Fetch once (waiting at most until the oldest pending batch is due), then
        write every batch that is due."""
        now = time.monotonic()
        wait = IDLE_WAIT_S
        for pend in self._pending.values():
            wait = min(wait, max(0.0, pend.since + self.batch.max_age_s - now))
        if self._pending and self._caught_up:
            # A batch is gathering and the log had no more: take what arrives
            # meanwhile in one fetch, at most FETCH_INTERVAL_S later.
            pause = min(wait, self._fetched_at + FETCH_INTERVAL_S - now)
            if pause > 0:
                await asyncio.sleep(pause)
                wait -= pause
        fetched = await self.consumer.fetch(FETCH_BYTES, max(0.0, wait))
        now = self._fetched_at = time.monotonic()
        b = self.batch
        add = self._add
        nbytes = 0
        for record, value in zip(fetched, self._values(fetched), strict=True):
            nbytes += len(record.payload)
            pend = add(record, value, now)
            if pend.count >= b.max_events or pend.nbytes >= b.max_bytes:
                await self._deliver(record.sublog.stream)
        self._caught_up = nbytes < FETCH_BYTES // 2
        now = time.monotonic()
        for stream, pend in list(self._pending.items()):
            if now - pend.since >= b.max_age_s:
                await self._deliver(stream)
        if self._uncommitted and now - self._committed_at >= CONSUMER_COMMIT_S:
            await self._commit_consumer()
        if now - self._lag_at >= LAG_INTERVAL_S:
            self._lag_at = now
            self._publish_lag()
        if fetched:
            # The fetch returned without waiting: let the other loops (and the
            # edge) run before the next one.
            await asyncio.sleep(0)

    def _values(self, fetched: list[ConsumerRecord]) -> list[Any]:
        """The decoded value of each fetched record, a sub-log's run of records at a
        time: what another loop of the worker left (evd.sinks.decoded), the others
        decoded in one ``decode_all`` (and left for the other loops)."""
        shared = self.decoded
        decode_all = self._decode_all
        values: list[Any] = []
        n = len(fetched)
        i = 0
        while i < n:
            sublog = fetched[i].sublog
            j = i + 1
            while j < n and fetched[j].sublog == sublog:
                j += 1
            stream = sublog.stream
            if shared is not None and stream in shared.readers:
                values += shared.values(fetched[i:j], decode_all)
            else:
                values += decode_all(stream, [r.payload for r in fetched[i:j]])
            i = j
        return values

    def _add(self, record: ConsumerRecord, value: Any, now: float) -> _Pending:
        """Take one record (and its decoded value) into its stream's pending batch
        (which it returns)."""
        sublog = record.sublog
        stream = sublog.stream
        payload = record.payload
        pend = self._pending.get(stream)
        if pend is None:
            pend = self._pending[stream] = _Pending(now)
        pend.offsets[sublog] = record.next_offset
        pend.nbytes += len(payload)
        if stream in _EVENT_STREAMS:
            raw_offset = value.raw_offset
            if raw_offset >= 0:
                key = (stream, sublog.partition, value.raw_source)
                if raw_offset <= self._seen.get(key, -1):
                    return pend  # emitted again by a processor replaying after a crash
                self._seen[key] = pend.seen[key] = raw_offset
            if self.event_types is not None:
                whole = value
                value, dropped = rows.filter_event_types(stream, value, self.event_types)
                if dropped:
                    hour = rows.hour_of(whole.received_at)
                    for ev in whole.events:
                        pend.filtered[hour, ev.event_type] += 1
                    for ev in value.events:
                        pend.filtered[hour, ev.event_type] -= 1
            items = len(value.events)
        else:
            items = rows.count_items(stream, value)
        pend.values.append(value)
        pend.partitions.append(sublog.partition)
        pend.count += items
        if items:
            stamp = records.timestamp_of(payload)
            pend.stamps.append((int(time.time() * 1000) if stamp is None else stamp, items))
        return pend

    # -- writing ----------------------------------------------------------------------

    async def _deliver(self, stream: str) -> None:
        pend = self._pending.pop(stream)
        batch = Batch(stream, pend.values, pend.count, pend.nbytes, pend.partitions)
        counts: Counter[CountKey] = Counter()
        if pend.values:
            self._writing = pend
            try:
                written = await self._write(batch)
            finally:
                self._writing = None
            if written is None:
                return  # stopping mid-retry: not committed, written again after a restart
            if written:
                counts.update(self._counts(batch))
            else:
                for (hour, event_type), n in rows.tally(batch).items():
                    counts[CountKey(hour, stream, event_type, "dead_lettered")] += n
        for (hour, event_type), n in pend.filtered.items():
            counts[CountKey(hour, stream, event_type, "filtered")] += n
        seen = {SeenKey(*key): offset for key, offset in pend.seen.items()}
        await self.ledger.commit(self.name, counts, pend.offsets, seen)
        self._uncommitted.update(pend.offsets)
        if self.metrics is not None and pend.stamps:
            now_ms = time.time() * 1000
            for stamp, items in pend.stamps:
                self.metrics.delay(max(0.0, (now_ms - stamp) / 1000), items)

    async def _commit_consumer(self) -> None:
        """Commit to the consumer the offsets the ledger holds (they register the
        sink for retention; a restart resumes from the ledger's)."""
        offsets, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        if offsets:
            await self.consumer.commit(offsets)

    def _counts(self, batch: Batch) -> Counter[CountKey]:
        custom = self.sink.counts(batch)
        if custom is not None:
            return Counter({CountKey(*k): n for k, n in custom.items()})
        return Counter({
            CountKey(hour, batch.stream, event_type, "delivered"): n
            for (hour, event_type), n in rows.tally(batch).items()
        })

    async def _write(self, batch: Batch) -> bool | None:
        """True: written; False: dead-lettered; None: given up because the loop stops."""
        attempt = 0
        m = self.metrics
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                await self.sink.write(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is the sink's, retried or dead-lettered
                if m is not None:
                    m.failed(batch.count)
                retriable = getattr(exc, "retriable", True)
                if not retriable or attempt >= self.retry.max_attempts:
                    log.error(
                        "sink %s: giving up on a batch of %d %s after %d write(s): %s",
                        self.name, batch.count, batch.stream, attempt, exc,
                    )
                    await self._dead_letter(batch, exc)
                    return False
                delay = self._backoff(attempt, getattr(exc, "retry_after", None))
                log.warning(
                    "sink %s: write %d of %d %s failed (%s); retrying in %.2f s",
                    self.name, attempt, batch.count, batch.stream, exc, delay,
                )
                self.retries += 1
                if m is not None:
                    m.retry()
                if not await self._back_off(delay):
                    return None
                continue
            if m is not None:
                m.write_time(time.perf_counter() - started)
                m.delivered(batch.count)
            self.delivered += batch.count
            return True

    async def _back_off(self, delay: float) -> bool:
        """Wait ``delay`` s, publishing the lag meanwhile (a failing target shows as a
        growing lag); False when the loop is asked to stop."""
        deadline = time.monotonic() + delay
        while True:
            self._publish_lag()
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            try:
                await asyncio.wait_for(self._stopping.wait(), min(left, LAG_INTERVAL_S))
            except TimeoutError:
                continue
            return False

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**(attempt-1))], or the
        target's Retry-After when it sent one."""
        if retry_after is not None:
            return min(max(0.0, retry_after), MAX_RETRY_AFTER_S)
        r = self.retry
        cap = min(r.max_backoff_s, r.initial_backoff_s * 2 ** (attempt - 1))
        return random.uniform(0, cap)

    async def _dead_letter(self, batch: Batch, exc: BaseException) -> None:
        """The items of ``batch`` to the dead_letter stream, with the error and where."""
        self.dead_lettered += batch.count
        if self.metrics is not None:
            self.metrics.dead_lettered(batch.count)
        if batch.stream == Stream.DEAD_LETTER or self.producer is None:
            # Dead letters are never dead-lettered again (a loop); they stay in the log.
            log.error("sink %s: %d dead letters not written: %s", self.name, batch.count, exc)
            return
        now = int(time.time() * 1000)
        error = f"{type(exc).__name__}: {exc}"[:1000]
        stage = f"sink:{self.name}"
        partition = batch.partitions[0] if batch.partitions else 0
        appends = [
            (
                Stream.DEAD_LETTER,
                partition,
                records.encode(
                    records.Kind.DEAD_LETTER, now,
                    DeadLetter(now, -1, error, line, stage, batch.stream),
                ),
            )
            for line in rows.json_lines(batch).splitlines()
        ]
        if appends:
            await self.producer.append_all(appends, internal=True)

    def _publish_lag(self) -> None:
        self._lag_at = time.monotonic()
        if self.metrics is None:
            return
        lag = self.consumer.lag()
        waiting = list(self._pending.values())
        if self._writing is not None:
            waiting.append(self._writing)
        nbytes = lag.bytes + sum(p.nbytes for p in waiting)
        seconds = lag.seconds
        now_ms = time.time() * 1000
        for pend in waiting:
            if pend.stamps:
                seconds = max(seconds, (now_ms - pend.stamps[0][0]) / 1000)
        self.metrics.lag(nbytes, seconds)
