"""Runs the processor of one raw partition: consume, process, produce, snapshot.

The loop, per fetch (at most one per PASS_INTERVAL_S while data keeps coming):
decode the raw records of every sub-log of the partition,
hand them to the PartitionProcessor (evd.state.processor), tick it with the
wall clock and the sub-logs that still have data, and append what it produced
to the output streams (``events``, ``late``, ``sessions``, ``charts``, same
partition number) as one all-or-nothing group. One group is in flight at a time:
the next fetch's outputs wait for the previous group to be durable, which
bounds what the processor holds in the log's queue.

Snapshots: every ``snapshot.interval_s`` and at a clean stop, once every output
produced so far is durable, the processor's state is saved with the raw offsets
it covers (and the ends of its sessions and charts streams), then those offsets
are committed as consumer ``processor`` (which lets retention delete raw
segments below them). After a crash the partition restarts from its latest
snapshot and replays the raw log after it, so it re-produces outputs already
appended since that snapshot; they carry the same ids (event_id, session_id,
the chart row's key), and idempotent sinks absorb them. Start-up replays at most
about one snapshot interval of log.

Revisions after a crash: the replay need not emit the same revisions as the run
that crashed (which events were late depends on the wall clock and on how the
sub-logs interleaved), so before replaying, the runner reads back what its
sessions and charts streams got after the snapshot and raises the processor's
next revision of each id above it (``PartitionProcessor.raise_revisions``): in
a stream, a later revision of an id is always higher, and "highest revision
wins" holds for every sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any

import msgspec

from evd.config import Config
from evd.core.log import Append, Consumer, Producer, SubLog, TopicPartition
from evd.core.log import records as rec
from evd.core.log.streams import Stream
from evd.core.schema import ChartsBatch, SessionsBatch
from evd.state import metrics
from evd.state.charts import RowKey
from evd.state.processor import Outputs, PartitionProcessor, PartitionState
from evd.state.revisions import RETRACTED, StreamRevisions
from evd.state.snapshots import Snapshot, SnapshotStore

__all__ = ["PartitionRunner", "output_records"]

log = logging.getLogger(__name__)

#: Raw bytes one fetch takes at most: bounds one pass's decoded events and outputs.
FETCH_BYTES = 128 << 10
#: Longest wait for raw data before the processor ticks the wall clock anyway
#: (idle sub-logs and partitions are noticed within this).
TICK_S = 0.5
#: While data keeps coming, a pass starts at most this long after the previous
#: one started: the records that arrived meanwhile are one fetch, one tick and one
#: group of outputs, instead of a pass (and an output group commit, which wakes
#: every reader) per request's record. The first record after an idle spell is
#: taken at once; this is what a busy partition's outputs may wait more.
PASS_INTERVAL_S = 0.02

_state_decoder = msgspec.msgpack.Decoder(PartitionState)
_state_encoder = msgspec.msgpack.Encoder()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class PartitionRunner:
    """The owner's processing of raw partition ``partition`` (one task)."""

    def __init__(
        self,
        partition: int,
        cfg: Config,
        producer: Producer,
        consumer: Consumer,
        store: SnapshotStore,
        sources: Collection[int] = (),
        phase: float = 0.0,
        outputs: Consumer | None = None,
    ) -> None:
        self.partition = partition
        #: An anonymous consumer of the partition's sessions and charts streams: their
        #: ends go into each snapshot, and a restore reads what came after (None:
        #: neither; revisions after a crash then restart from the snapshot's).
        self.outputs = outputs
        if outputs is not None:
            outputs.assign(
                [TopicPartition(Stream.SESSIONS, partition), TopicPartition(Stream.CHARTS, partition)]
            )
        #: The writers that may append to the partition (the running workers):
        #: known as sources from the start, each holds the watermark until it
        #: delivers or is idle for idle_timeout, so a writer whose sub-log is
        #: not there yet cannot find its first events late.
        self.sources = tuple(sources)
        #: Fraction of the snapshot interval this runner's snapshots are shifted by:
        #: a worker's partitions snapshot one after the other, not all at once (a
        #: snapshot encodes the partition's state on the event loop).
        self.phase = phase
        self.cfg = cfg
        self.producer = producer
        self.consumer = consumer
        self.store = store
        self.processor: PartitionProcessor | None = None
        self.out = Outputs()
        #: Index in out.events -> the msgpack bytes of that batch's events, for
        #: records whose events were all kept (forwarded without encoding again).
        self._forward: dict[int, msgspec.Raw] = {}
        self._closed_until: int | None = None
        self._forced = 0
        self._in_flight: asyncio.Future[None] | None = None
        self._stopping = False
        self._last_snapshot = 0.0

    async def restore(self) -> None:
        """Load the latest snapshot (or start empty) and position the consumer after it."""
        self.consumer.assign([TopicPartition(Stream.RAW, self.partition)])
        snapshot = await self.store.load(self.partition)
        now = _now_ms()
        chart_ms = self.cfg.charts.window_s * 1000
        if snapshot is None:
            self.processor = PartitionProcessor(
                self.partition, self.cfg.processing, chart_ms, now_ms=now
            )
            # No state: read everything retained, not from offsets committed
            # for a snapshot that is gone.
            known = {SubLog(Stream.RAW, self.partition, s) for s in self.sources}
            for sublog in known | set(self.consumer.positions()):
                self.consumer.seek_to_beginning(sublog)
            self.processor.tick(now, self.sources, self.out)
            return
        state = _state_decoder.decode(snapshot.state)
        self.processor = PartitionProcessor(
            self.partition, self.cfg.processing, chart_ms, state=state, now_ms=now
        )
        if snapshot.outputs is not None and self.outputs is not None:
            sessions, rows = await self._emitted_since(snapshot.outputs)
            self.processor.raise_revisions(sessions, rows)
        ends = await self.consumer.end_offsets()
        self._forced = self.processor.forced
        self._closed_until = self.processor.closed_until
        for writer, offset in snapshot.offsets.items():
            sublog = SubLog(Stream.RAW, self.partition, writer)
            end = ends.get(sublog, 0)
            if offset > end:
                # The raw log lost records this snapshot already covers (fsync:
                # never or interval, then a power cut): appends go on from the
                # sub-log's end, so that is where reading goes on.
                log.error(
                    "partition %d: the snapshot covers %s up to %d, but it ends at %d (records"
                    " lost after they were processed); reading on from its end",
                    self.partition, sublog, offset, end,
                )
                offset = end
            self.consumer.seek(sublog, offset)
        self.processor.tick(now, self.sources, self.out)
        log.info(
            "partition %d restored from its snapshot of %d (offsets %s)",
            self.partition, snapshot.taken_at, snapshot.offsets,
        )

    async def _emitted_since(
        self, starts: dict[str, dict[int, int]]
    ) -> tuple[StreamRevisions[str], StreamRevisions[RowKey]]:
        """Every revision (and size) of each session and chart row in the partition's
        output streams from ``starts`` (a snapshot's ``outputs``) to their ends now."""
        reader = self.outputs
        assert reader is not None
        ends = await reader.end_offsets()
        for sublog in ends:
            start = starts.get(sublog.stream, {}).get(sublog.source)
            if start is None:
                reader.seek_to_beginning(sublog)  # a writer that came after the snapshot
            else:
                reader.seek(sublog, min(start, ends[sublog]))
        keep = self.cfg.processing.session_gap_ms + self.cfg.processing.allowed_lateness_ms
        sessions: StreamRevisions[str] = StreamRevisions()
        rows: StreamRevisions[RowKey] = StreamRevisions()
        while any(reader.positions().get(s, 0) < end for s, end in ends.items()):
            records = await reader.fetch(FETCH_BYTES, TICK_S)
            if not records:
                break  # nothing more arrives: what is there has been read
            for record in records:
                if record.offset >= ends.get(record.sublog, 0):
                    continue
                value = rec.decode(record.payload, record.sublog.stream)
                if isinstance(value, SessionsBatch):
                    for s in value.sessions:
                        size = RETRACTED if s.retracted else s.event_count
                        sessions.add(s.session_id, s.revision, size, s.ended_at + keep)
                elif isinstance(value, ChartsBatch):
                    for r in value.rows:
                        key = (r.window_start, r.country, r.track_id)
                        rows.add(key, r.revision, r.plays, r.window_start)
        return sessions, rows

    async def close(self) -> None:
        """Close the consumers (after run() ended)."""
        await self.consumer.close()
        if self.outputs is not None:
            await self.outputs.close()

    def stop(self) -> None:
        """Ask run() to end after its current pass (it snapshots first)."""
        self._stopping = True

    async def run(self) -> None:
        """Process until stop(); then wait for the outputs and snapshot."""
        loop = asyncio.get_running_loop()
        interval = self.cfg.snapshot.interval_s
        self._last_snapshot = loop.time() - interval * self.phase
        while not self._stopping:
            started = loop.time()
            if await self.step(TICK_S):
                # Busy: let the next records gather (the stop flag is seen after it).
                await asyncio.sleep(started + PASS_INTERVAL_S - loop.time())
            if loop.time() - self._last_snapshot >= interval:
                await self.snapshot()
        await self.snapshot()

    async def step(self, timeout: float) -> int:
        """One pass: fetch (waiting up to ``timeout``), process, append; raw records taken."""
        proc = self.processor
        assert proc is not None, "run() before restore()"
        records = await self.consumer.fetch(FETCH_BYTES, timeout)
        out = self.out
        now = _now_ms()
        events = 0
        decode = rec.decode_raw
        forward = self._forward
        for record in records:
            batch, raw_events = decode(record.payload)
            events += len(batch.events)
            before = len(out.events)
            proc.process(record.sublog.source, batch, now, out, record.offset, release=False)
            if len(out.events) > before and len(out.events[-1].events) == len(batch.events):
                forward[before] = raw_events  # every event kept: forward the bytes
        proc.tick(now, {s.source for s in self.consumer.backlog()}, out)
        metrics.PROCESSED.inc(events)
        await self._produce(now)
        return len(records)

    async def _produce(self, now: int) -> None:
        out = self.out
        appends, self._closed_until = output_records(
            self.partition, out, now, self._forward, self._closed_until
        )
        if out.sessions:
            metrics.SESSIONS_CLOSED.inc(len(out.sessions))
        if out.chart_rows:
            metrics.CHART_ROWS.inc(len(out.chart_rows))
        metrics.PROCESSOR_DUPLICATES.inc(out.duplicates)
        late = sum(len(b.events) for b in out.late)
        if late:
            metrics.PROCESSOR_LATE.inc(metrics.LATE_LATENESS, late - out.late_forced)
            if out.late_forced:
                metrics.PROCESSOR_LATE.inc(metrics.LATE_BUFFER_FULL, out.late_forced)
        forced = self.processor.forced if self.processor is not None else 0
        if forced != self._forced:
            metrics.PROCESSOR_FORCED.inc(forced - self._forced)
            self._forced = forced
        out.clear()
        self._forward.clear()
        if self._in_flight is not None:
            await self._in_flight  # one group in flight: bounds what waits in the log
            self._in_flight = None
        if appends:
            self._in_flight = self.producer.append_all(appends, internal=True)

    async def snapshot(self) -> None:
        """Save the state with the offsets it covers, after its outputs are durable."""
        proc = self.processor
        assert proc is not None
        if self._in_flight is not None:
            await self._in_flight
            self._in_flight = None
        positions = self.consumer.positions()
        outputs: dict[str, dict[int, int]] | None = None
        if self.outputs is not None:
            outputs = {}
            for sublog, end in (await self.outputs.end_offsets()).items():
                outputs.setdefault(sublog.stream, {})[sublog.source] = end
        snapshot = Snapshot(
            partition=self.partition,
            taken_at=_now_ms(),
            offsets={s.source: o for s, o in positions.items()},
            state=await encode_state(proc.snapshot()),
            outputs=outputs,
        )
        await self.store.save(snapshot)
        await self.consumer.commit(positions)
        metrics.SNAPSHOTS.inc()
        self._last_snapshot = asyncio.get_running_loop().time()


#: Open sessions or dedup groups encoded between two yields to the event loop.
ENCODE_CHUNK = 2000


async def encode_state(state: PartitionState) -> msgspec.Raw:
    """``state`` encoded, its long lists (open sessions, kept sessions, dedup groups) a
    chunk at a time with the event loop served in between.

    Encoding a busy partition's whole state at once held the loop for tens to
    hundreds of milliseconds (docs/performance.md, "Snapshots and latency"). The
    state shares the processor's live objects, which nothing changes meanwhile:
    only the runner, now awaiting here, processes the partition.
    """
    # Raw values in place of the lists: the encoder writes them as they are.
    state.sessions.sessions = await _encode_list(state.sessions.sessions)  # type: ignore[assignment]
    state.sessions.emitted = await _encode_list(state.sessions.emitted)  # type: ignore[assignment]
    state.dedup.groups = await _encode_list(state.dedup.groups)  # type: ignore[assignment]
    return msgspec.Raw(_state_encoder.encode(state))


async def _encode_list(items: list[Any]) -> msgspec.Raw:
    """A msgpack array of ``items``, encoded ENCODE_CHUNK at a time."""
    encode = _state_encoder.encode
    body: list[bytes] = []
    for start in range(0, len(items), ENCODE_CHUNK):
        chunk = encode(items[start : start + ENCODE_CHUNK])
        body.append(chunk[_array_header_size(chunk[0]) :])
        await asyncio.sleep(0)
    return msgspec.Raw(_array_header(len(items)) + b"".join(body))


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items."""
    if n <= 15:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _array_header_size(first: int) -> int:
    """The size of a msgpack array header from its first byte."""
    if first & 0xF0 == 0x90:
        return 1
    return 3 if first == 0xDC else 5


def output_records(
    partition: int,
    out: Outputs,
    now: int,
    forward: dict[int, msgspec.Raw],
    closed_until: int | None,
) -> tuple[list[Append], int | None]:
    """The records of one pass's outputs, and the charts' closed_until after them.

    One ``events`` (and ``late``) record per raw record that kept events (the
    raw bytes of its events forwarded where ``forward`` has them), one
    ``sessions`` record with every session emitted, one ``charts`` record when
    rows were emitted or ``closed_until`` or ``final_until`` moved (a record with
    no rows still tells readers that time moved on).
    """
    p = partition
    encode = rec.encode
    appends: list[Append] = [
        (Stream.EVENTS, p, rec.encode_events(rec.Kind.EVENTS, b.received_at, b, forward.get(i)))
        for i, b in enumerate(out.events)
    ]
    appends += [(Stream.LATE, p, encode(rec.Kind.LATE, b.received_at, b)) for b in out.late]
    if out.sessions or out.sessions_until is not None:
        batch = SessionsBatch(out.sessions, out.sessions_until)
        appends.append((Stream.SESSIONS, p, encode(rec.Kind.SESSIONS, now, batch)))
    if (
        out.chart_rows
        or out.final_until is not None
        or (out.closed_until is not None and out.closed_until != closed_until)
    ):
        closed = out.closed_until if out.closed_until is not None else closed_until
        assert closed is not None, "chart rows before any window closed"
        closed_until = closed
        charts = ChartsBatch(p, closed, out.chart_rows, out.final_until)
        appends.append((Stream.CHARTS, p, encode(rec.Kind.CHARTS, now, charts)))
    return appends, closed_until
