"""The Kafka log (``log.backend: kafka``): the Producer and Consumer roles over aiokafka,
and the group membership that hands partitions to process and deliver pods.

Every stream is a topic ``{kafka.topic_prefix}{stream}`` with ``log.partitions``
partitions; a Kafka partition plays the part of the embedded log's set of
sub-logs, so every record's sub-log has source 0, and its offsets are Kafka's
(``next_offset`` = offset + 1). Records carry the same versioned msgpack
micro-batches as the embedded log (evd.core.records), keyed by their partition
number; the producer writes with ``acks=all``.

Consumers here are *assigned* partitions (the Consumer contract): which
partitions a process gets is decided by a :class:`GroupMember`, a member of one
consumer group per role that reads nothing itself and calls the role back when
partitions are revoked or assigned. Reading consumers commit under their own
group id (``{prefix}{name}``) with no membership, so Kafka's tools show every
sink's and the processors' offsets and lag by name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import OffsetAndMetadata

from evd.core.config import Config, KafkaConfig
from evd.core.errors import LogOverloaded, LogUnavailable
from evd.core.log import (
    CHARTS,
    DEAD_LETTER,
    EVENTS,
    LATE,
    RAW,
    SESSIONS,
    Append,
    Consumer,
    ConsumerRecord,
    InvalidOffset,
    Lag,
    Producer,
    SubLog,
    TopicPartition,
)

__all__ = [
    "STREAMS",
    "GroupMember",
    "KafkaConsumer",
    "KafkaLog",
    "client_options",
    "ensure_topics",
    "topic_name",
]

log = logging.getLogger(__name__)

#: Every stream of the log: a topic each.
STREAMS = (RAW, DEAD_LETTER, EVENTS, LATE, SESSIONS, CHARTS)
#: Start-up: pause between attempts to reach the brokers.
CONNECT_RETRY_S = 1.0
#: How long KafkaConsumer.end_offsets waits for its probe fetches' answers.
END_PROBE_TIMEOUT_S = 10.0


def topic_name(k: KafkaConfig, stream: str) -> str:
    return f"{k.topic_prefix}{stream}"


def client_options(k: KafkaConfig) -> dict[str, Any]:
    """The connection options every aiokafka client of ``k`` takes (servers, security)."""
    sec = k.security
    opts: dict[str, Any] = {
        "bootstrap_servers": list(k.bootstrap_servers),
        "security_protocol": sec.protocol,
    }
    if sec.protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile
        )
        opts["ssl_context"] = context
    if sec.sasl_mechanism is not None:
        opts["sasl_mechanism"] = sec.sasl_mechanism
        opts["sasl_plain_username"] = sec.sasl_username
        opts["sasl_plain_password"] = sec.sasl_password
    return opts


async def _start_with_retry(client: Any, k: KafkaConfig, what: str) -> None:
    """``client.start()``, tried again until kafka.connect_timeout_s (brokers still starting)."""
    deadline = time.monotonic() + k.connect_timeout_s
    while True:
        try:
            await client.start()
            return
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                raise LogUnavailable(
                    f"kafka: {what} cannot reach {', '.join(k.bootstrap_servers)}: {exc}"
                ) from None
            log.warning("kafka: %s cannot reach the brokers yet (%s); trying again", what, exc)
            await asyncio.sleep(CONNECT_RETRY_S)


async def ensure_topics(
    k: KafkaConfig, partitions: Mapping[str, int], retention_ms: int | None = None
) -> None:
    """Create the topics of ``partitions`` (stream -> count) that do not exist yet."""
    admin = AIOKafkaAdminClient(**client_options(k))
    await _start_with_retry(admin, k, "the admin client")
    try:
        existing = set(await admin.list_topics())
        configs = {} if retention_ms is None else {"retention.ms": str(retention_ms)}
        missing = [
            NewTopic(topic_name(k, stream), count, k.replication_factor, topic_configs=configs)
            for stream, count in partitions.items()
            if topic_name(k, stream) not in existing
        ]
        if not missing:
            return
        try:
            await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass  # another pod created them meanwhile
        log.info("kafka: created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


class KafkaLog(Producer):
    """The Producer over Kafka: one aiokafka producer, ``acks=all``.

    An append's future completes once the broker acknowledged the record, and
    fails with LogUnavailable when it did not within ``kafka.ack_timeout_s`` (the
    edge answers 503 + Retry-After; never 200 for a record not acknowledged).
    After such a failure new requests are refused at once for
    ``kafka.unavailable_s``, so a broker that is down costs each client one
    quick 503, and the first request after it recovers goes through: no
    restart. Bytes not yet acknowledged are bounded by ``log.max_pending_bytes``
    (LogOverloaded above it; a stage's own appends are not refused).

    Batching: records are appended to one open record batch per partition
    (aiokafka's BatchBuilder), which is handed to aiokafka whole
    (``send_batch``) ``kafka.linger_ms`` after the first record of the round,
    when it reaches ``kafka.max_batch_bytes``, or, while the partition's previous
    batch is still in aiokafka's hands, as soon as that one was taken. So the
    records of every request of a round that go to one partition travel as one
    batch, and batches grow with the load; per record only the builder's append
    is paid, not aiokafka's per-message send path (about 15% less of the edge's
    CPU per event at 80,000 events/s; bench/README.md).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.k = cfg.kafka
        self.partitions = cfg.log.partitions
        self.max_pending = cfg.log.max_pending_bytes
        self.pending_bytes = 0
        self._producer: AIOKafkaProducer | None = None
        self._topics = {stream: topic_name(self.k, stream) for stream in STREAMS}
        self._keys = [str(p).encode() for p in range(self.partitions)]
        self._unavailable_until = 0.0
        self._last_error = ""
        self._closed = False
        #: Each partition's batch being filled (for kafka.linger_ms), and its waiters.
        self._open: dict[tuple[str, int], _OpenBatch] = {}
        self._linger: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Future[None]] = set()
        #: Partitions with a batch in aiokafka's hands -> full batches waiting behind it.
        self._queued: dict[tuple[str, int], list[_OpenBatch]] = {}
        self._waiters: set[_Waiter] = set()

    @property
    def writable(self) -> bool:
        return self._producer is not None and not self._closed

    @property
    def overloaded(self) -> bool:
        return self.pending_bytes > self.max_pending

    @property
    def stream_partitions(self) -> dict[str, int]:
        return dict.fromkeys(STREAMS, self.partitions)

    def partitions_of(self, stream: str) -> int:
        return self.partitions

    async def start(self) -> None:
        if self.k.create_topics:
            await ensure_topics(
                self.k, self.stream_partitions,
                # max_age_s 0 keeps records for ever: Kafka's -1 (its 0 deletes at once).
                retention_ms=int(self.cfg.log.retention.max_age_s * 1000) or -1,
            )
        k = self.k
        producer = AIOKafkaProducer(
            **client_options(k),
            acks="all",
            enable_idempotence=k.idempotence,
            linger_ms=0,  # batches are built here (kafka.linger_ms) and go as they are
            max_batch_size=k.max_batch_bytes,
            max_request_size=k.max_request_bytes,
            request_timeout_ms=int(k.ack_timeout_s * 1000),
        )
        await _start_with_retry(producer, k, "the producer")
        self._producer = producer

    def _check(self, records: Iterable[Append]) -> None:
        for stream, partition, _ in records:
            if stream not in self._topics:
                raise ValueError(f"{stream!r} is not a stream name")
            if not 0 <= partition < self.partitions:
                raise ValueError(
                    f"partition {partition} of {stream} out of range 0..{self.partitions - 1}"
                )

    def _admit(self, size: int, internal: bool) -> None:
        if self._closed or self._producer is None:
            raise LogUnavailable("the kafka producer is closed")
        if internal:
            return
        if time.monotonic() < self._unavailable_until:
            raise LogUnavailable(f"kafka: {self._last_error}")
        if self.pending_bytes + size > self.max_pending and self.pending_bytes:
            raise LogOverloaded(
                f"{self.pending_bytes} bytes wait for the broker's acknowledgement"
            )

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        self._check(records)
        size = sum(len(payload) for _, _, payload in records)
        self._admit(size, internal)
        return self._enqueue(records, size, offsets=False)

    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        self._check(((stream, partition, payload),))
        self._admit(len(payload), internal)
        return self._enqueue(((stream, partition, payload),), len(payload), offsets=True)

    def _enqueue(self, records: Sequence[Append], size: int, offsets: bool) -> asyncio.Future[Any]:
        """Add ``records`` to the open batches of their partitions; the future of them all."""
        producer = self._producer
        assert producer is not None
        loop = asyncio.get_running_loop()
        # Pending from admission on, so appends admitted in one turn of the loop
        # count against each other.
        self.pending_bytes += size
        waiter = _Waiter(loop.create_future(), len(records), size, offsets)
        waiter.timer = loop.call_later(self.k.ack_timeout_s, self._expire, waiter)
        self._waiters.add(waiter)
        keys = self._keys
        for index, (stream, partition, payload) in enumerate(records):
            key = (stream, partition)
            batch = self._open.get(key)
            if batch is None:
                batch = self._open[key] = _OpenBatch(producer.create_batch())
            if batch.builder.append(timestamp=None, key=keys[partition], value=payload) is None:
                self._ship(key, self._open.pop(key))  # full: it goes (or queues), another opens
                batch = self._open[key] = _OpenBatch(producer.create_batch())
                if batch.builder.append(timestamp=None, key=keys[partition], value=payload) is None:
                    raise AssertionError("an empty batch refused a record")
            batch.entries.append((waiter, index))
        if self._linger is None:
            self._linger = loop.call_later(self.k.linger_ms / 1000, self._ship_all)
        return waiter.future

    def _ship_all(self) -> None:
        """The linger is over: every open batch goes, except those of partitions whose
        previous batch aiokafka has not taken yet (they go when it has)."""
        self._linger = None
        for key in [k for k in self._open if k not in self._queued]:
            self._ship(key, self._open.pop(key))

    def _ship(self, key: tuple[str, int], batch: _OpenBatch) -> None:
        """Hand ``batch`` to aiokafka, or queue it behind the partition's batch in hand.

        aiokafka takes one batch per partition at a time (the next waits until the
        one before was sent), so a partition has one send_batch call in progress:
        meanwhile records gather in its open batch, which grows with the load.
        """
        queued = self._queued.get(key)
        if queued is not None:
            queued.append(batch)
            return
        self._queued[key] = []
        task = asyncio.ensure_future(self._send_batch(key, batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_batch(self, key: tuple[str, int], batch: _OpenBatch) -> None:
        """Hand one partition's batches to aiokafka in turn; settle each one's waiters
        when the broker acknowledges it."""
        producer = self._producer
        assert producer is not None
        stream, partition = key
        topic = self._topics[stream]
        while True:
            try:
                ack = await producer.send_batch(batch.builder, topic, partition=partition)
            except KafkaError as exc:
                self._fail_batch(batch, exc)
            else:
                ack.add_done_callback(functools.partial(self._acked, batch))
            queued = self._queued[key]
            if queued:
                batch = queued.pop(0)
            elif key in self._open and self._linger is None:
                batch = self._open.pop(key)  # gathered while the one before was in hand
            else:
                del self._queued[key]
                return

    def _acked(self, batch: _OpenBatch, ack: asyncio.Future[Any]) -> None:
        if ack.cancelled() or ack.exception() is not None:
            self._fail_batch(batch, ack.exception() or KafkaError("cancelled"))
            return
        base = ack.result().offset
        for position, (waiter, index) in enumerate(batch.entries):
            if waiter.offsets is not None:
                waiter.offsets[index] = base + position
            waiter.left -= 1
            if waiter.left == 0:
                self._settle(waiter, None)

    def _fail_batch(self, batch: _OpenBatch, exc: BaseException) -> None:
        if all(waiter.future.done() for waiter, _ in batch.entries):
            return  # every request in it was answered already (expired): nothing to tell
        self._failed(f"{type(exc).__name__}: {exc}")
        for waiter, _ in batch.entries:
            self._settle(waiter, LogUnavailable(f"kafka: {self._last_error}"))

    def _expire(self, waiter: _Waiter) -> None:
        self._failed(f"no acknowledgement from the broker within {self.k.ack_timeout_s:g} s")
        self._settle(waiter, LogUnavailable(f"kafka: {self._last_error}"))

    def _settle(self, waiter: _Waiter, error: Exception | None) -> None:
        """Complete ``waiter`` once (an ack after its expiry changes nothing)."""
        if waiter.future.done() or waiter not in self._waiters:
            return
        self._waiters.discard(waiter)
        self.pending_bytes -= waiter.size
        if waiter.timer is not None:
            waiter.timer.cancel()
        if error is not None:
            waiter.future.set_exception(error)
        else:
            waiter.future.set_result(None if waiter.offsets is None else waiter.offsets[0])

    def _failed(self, why: str) -> None:
        if time.monotonic() >= self._unavailable_until:
            log.warning("kafka: an append failed (%s): refusing requests for %g s",
                        why, self.k.unavailable_s)
        self._last_error = why
        self._unavailable_until = time.monotonic() + self.k.unavailable_s

    async def flush(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._ship_all()
        waiting = [w.future for w in self._waiters]
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)

    async def close(self) -> None:
        if self._closed:
            return
        await self.flush()
        self._closed = True
        for waiter in list(self._waiters):
            self._settle(waiter, LogUnavailable("the kafka producer is closed"))
        if self._producer is not None:
            await self._producer.stop()


class _Waiter:
    """One append call: its future completes when all its records are acknowledged."""

    __slots__ = ("future", "left", "offsets", "size", "timer")

    def __init__(self, future: asyncio.Future[Any], count: int, size: int, offsets: bool) -> None:
        self.future = future
        self.left = count
        self.size = size
        self.offsets: list[int] | None = [0] * count if offsets else None
        self.timer: asyncio.TimerHandle | None = None


class _OpenBatch:
    """One partition's record batch being filled, and whose records are in it."""

    __slots__ = ("builder", "entries")

    def __init__(self, builder: Any) -> None:
        self.builder = builder
        self.entries: list[tuple[_Waiter, int]] = []


class KafkaConsumer(Consumer):
    """Consumer ``name`` of the Kafka log: assigned partitions, offsets committed
    under group id ``{prefix}{name}`` (no membership).

    ``name`` None: an anonymous reader that cannot commit. A partition starts
    where a seek put it, else at the committed offset, else at the oldest
    retained record. Lag is estimated: in bytes from the records behind and the
    mean size of those read so far (Kafka counts records, not bytes); in seconds
    from the timestamp of the last record read, when more are behind it.
    """

    def __init__(self, cfg: Config, name: str | None) -> None:
        self.k = cfg.kafka
        self.name = name
        self._consumer = AIOKafkaConsumer(
            **client_options(self.k),
            group_id=None if name is None else f"{self.k.topic_prefix}{name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.k.max_request_bytes,
            fetch_max_bytes=4 * self.k.max_request_bytes,
        )
        self._started = False
        self._assigned: set[TopicPartition] = set()
        self._streams = {topic_name(self.k, s): s for s in STREAMS}
        self._positions: dict[SubLog, int] = {}
        self._beginning: set[SubLog] = set()
        self._ends: dict[SubLog, int] = {}
        self._stamps: dict[SubLog, int] = {}
        self._record_bytes = 1024.0
        self._commit_lock = asyncio.Lock()
        #: Seeks not yet checked against their partition's records (at the next fetch).
        self._unchecked: set[SubLog] = set()
        #: An anonymous consumer whose fetches' high watermarks make end_offsets exact.
        self._probe: AIOKafkaConsumer | None = None
        self._probe_lock = asyncio.Lock()

    async def _ensure_started(self) -> None:
        if not self._started:
            await _start_with_retry(self._consumer, self.k, f"consumer {self.name}")
            self._started = True
            self._apply_assignment()

    def _tp(self, sublog: SubLog | TopicPartition) -> KafkaTP:
        return KafkaTP(topic_name(self.k, sublog[0]), sublog[1])

    def _sublog(self, tp: KafkaTP) -> SubLog:
        return SubLog(self._streams[tp.topic], tp.partition, 0)

    def _apply_assignment(self) -> None:
        self._consumer.assign([self._tp(tp) for tp in sorted(self._assigned)])
        for sublog, offset in self._positions.items():
            self._consumer.seek(self._tp(sublog), offset)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._assigned = {TopicPartition(*tp) for tp in partitions}
        mine = {SubLog(s, p, 0) for s, p in self._assigned}
        self._positions = {s: o for s, o in self._positions.items() if s in mine}
        self._unchecked &= mine
        if self._started:
            self._apply_assignment()

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def _resolve(self) -> None:
        """Start, apply pending seeks to the beginning, learn every position."""
        await self._ensure_started()
        if self._beginning:
            tps = [self._tp(s) for s in self._beginning]
            self._beginning.clear()
            await self._consumer.seek_to_beginning(*tps)
        for tp in sorted(self._assigned):
            sublog = SubLog(tp.stream, tp.partition, 0)
            if sublog not in self._positions:
                self._positions[sublog] = await self._consumer.position(self._tp(tp))

    async def fetch(self, max_bytes: int = 1 << 20, timeout: float = 1.0) -> list[ConsumerRecord]:
        await self._resolve()
        if not self._assigned:
            await asyncio.sleep(timeout)
            return []
        if self._unchecked:
            await self._check_seeks()
        max_records = max(1, int(max_bytes / self._record_bytes))
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[ConsumerRecord] = []
        size = 0
        for tp, messages in batches.items():
            sublog = self._sublog(tp)
            for m in messages:
                out.append(ConsumerRecord(sublog, m.offset, m.offset + 1, m.value))
                size += len(m.value)
            if messages:
                self._positions[sublog] = messages[-1].offset + 1
                self._stamps[sublog] = messages[-1].timestamp
            end = self._consumer.highwater(tp)
            if end is not None:
                self._ends[sublog] = end
        if out:
            self._record_bytes = 0.8 * self._record_bytes + 0.2 * (size / len(out))
        return out

    def seek(self, sublog: SubLog, offset: int) -> None:
        sublog = SubLog(*sublog)
        if offset < 0:
            raise InvalidOffset(f"offset {offset} of {sublog} is negative")
        self._positions[sublog] = offset
        self._beginning.discard(sublog)
        self._unchecked.add(sublog)
        if self._started:
            self._consumer.seek(self._tp(sublog), offset)

    def seek_to_beginning(self, sublog: SubLog) -> None:
        sublog = SubLog(*sublog)
        self._positions.pop(sublog, None)
        self._beginning.add(sublog)
        self._unchecked.discard(sublog)

    async def _check_seeks(self) -> None:
        """InvalidOffset for a position a seek put before the oldest retained record
        or past the end (aiokafka would read on from the oldest, or wait there)."""
        sublogs = sorted(s for s in self._unchecked if (s.stream, s.partition) in self._assigned)
        if not sublogs:
            return
        tps = [self._tp(s) for s in sublogs]
        firsts = await self._consumer.beginning_offsets(tps)
        listed = await self._consumer.end_offsets(tps)
        # Only positions past the listed end need the exact end (the probe).
        past = {tp: listed[tp] for s, tp in zip(sublogs, tps) if self._positions[s] > listed[tp]}
        ends = listed | await self._exact_ends(past)
        for sublog, tp in zip(sublogs, tps):
            offset = self._positions[sublog]
            if not firsts[tp] <= offset <= ends[tp]:
                raise InvalidOffset(
                    f"offset {offset} of {sublog} is outside its records {firsts[tp]}..{ends[tp]}"
                )
            self._unchecked.discard(sublog)

    def positions(self) -> dict[SubLog, int]:
        return dict(self._positions)

    def backlog(self) -> set[SubLog]:
        return {s for s, o in self._positions.items() if self._ends.get(s, 0) > o}

    async def end_offsets(self) -> dict[SubLog, int]:
        await self._resolve()
        tps = [self._tp(tp) for tp in sorted(self._assigned)]
        if not tps:
            return {}
        ends = await self._exact_ends(await self._consumer.end_offsets(tps))
        for tp, end in ends.items():
            self._ends[self._sublog(tp)] = end
        return {self._sublog(tp): end for tp, end in ends.items()}

    async def _exact_ends(self, listed: Mapping[KafkaTP, int]) -> dict[KafkaTP, int]:
        """``listed`` (ListOffsets' latest offsets), each raised to the high watermark
        of a fetch at its end - 1. ListOffsets may answer less than the end: the
        Tansu broker answers the last record batch's base offset + 1; a fetch's
        high watermark is the end (and ListOffsets never answers more)."""
        ends = dict(listed)
        tps = [tp for tp, end in ends.items() if end > 0]
        if not tps:
            return ends
        async with self._probe_lock:  # one use of the probe's assignment at a time
            return await self._probe_ends(ends, tps)

    async def _probe_ends(self, ends: dict[KafkaTP, int], tps: list[KafkaTP]) -> dict[KafkaTP, int]:
        if self._probe is None:
            probe = AIOKafkaConsumer(
                **client_options(self.k), group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", max_partition_fetch_bytes=self.k.max_request_bytes,
            )
            await _start_with_retry(probe, self.k, f"the end probe of consumer {self.name}")
            self._probe = probe
        probe = self._probe
        probe.assign(tps)  # fresh partition states: no high watermark known yet
        try:
            for tp in tps:
                probe.seek(tp, ends[tp] - 1)
            deadline = time.monotonic() + END_PROBE_TIMEOUT_S
            while missing := [tp for tp in tps if probe.highwater(tp) is None]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LogUnavailable(
                        f"kafka: no fetch answer for the end of {missing[0].topic}"
                        f"/{missing[0].partition} within {END_PROBE_TIMEOUT_S:g} s"
                    )
                await probe.getmany(*missing, timeout_ms=int(min(left, 0.1) * 1000) + 1)
            for tp in tps:
                ends[tp] = max(ends[tp], probe.highwater(tp))
        finally:
            probe.assign([])
        return ends

    async def commit(self, offsets: Mapping[SubLog, int] | None = None) -> None:
        if self.name is None:
            raise RuntimeError("an anonymous consumer cannot commit")
        await self._ensure_started()
        chosen = dict(self._positions if offsets is None else offsets)
        if not chosen:
            return
        async with self._commit_lock:
            await self._consumer.commit(
                {self._tp(s): OffsetAndMetadata(o, "") for s, o in chosen.items()}
            )

    async def committed(self) -> dict[SubLog, int]:
        if self.name is None:
            return {}
        await self._ensure_started()
        out: dict[SubLog, int] = {}
        for tp in sorted(self._assigned):
            offset = await self._consumer.committed(self._tp(tp))
            if offset is not None:
                out[SubLog(tp.stream, tp.partition, 0)] = offset
        return out

    def lag(self, now: float | None = None) -> Lag:
        behind = 0
        oldest: float | None = None
        for sublog, position in self._positions.items():
            gap = self._ends.get(sublog, position) - position
            if gap > 0:
                behind += gap
                stamp = self._stamps.get(sublog)
                if stamp is not None and (oldest is None or stamp < oldest):
                    oldest = stamp
        now = time.time() if now is None else now
        seconds = 0.0 if oldest is None else max(0.0, now - oldest / 1000)
        return Lag(int(behind * self._record_bytes), seconds)

    async def close(self) -> None:
        # Stopped even if never started: aiokafka reports an unclosed consumer when it is collected.
        self._started = False
        await self._consumer.stop()
        if self._probe is not None:
            probe, self._probe = self._probe, None
            await probe.stop()


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: set[KafkaTP]) -> None:
        await self.member._revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[KafkaTP]) -> None:
        await self.member._assigned(assigned)


class GroupMember:
    """One process's membership in consumer group ``{prefix}{group}`` over
    ``topic``'s partitions: reads nothing, calls ``on_revoked`` (before the
    partitions go, awaited: the time a processor has to snapshot) and
    ``on_assigned`` with partition numbers. Errors in them go to ``on_failure``.
    """

    def __init__(
        self,
        cfg: Config,
        group: str,
        stream: str,
        on_assigned: Callable[[set[int]], Awaitable[None]],
        on_revoked: Callable[[set[int]], Awaitable[None]],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        k = cfg.kafka
        self.k = k
        self.group = f"{k.topic_prefix}{group}"
        self.topic = topic_name(k, stream)
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.on_failure = on_failure
        self.partitions: set[int] = set()
        self._consumer = AIOKafkaConsumer(
            **client_options(k),
            group_id=self.group,
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            rebalance_timeout_ms=int(k.revoke_budget_s * 1000) + k.session_timeout_ms,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await _start_with_retry(self._consumer, self.k, f"member of {self.group}")
        self._consumer.subscribe([self.topic], listener=_Listener(self))
        self._task = asyncio.get_running_loop().create_task(self._poll())
        self._task.add_done_callback(self._poll_ended)

    def _poll_ended(self, task: asyncio.Task[None]) -> None:
        # aiokafka retries what is transient itself; an error out of getmany is
        # fatal to the membership (authorization, a fenced member): the worker stops.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("kafka: group %s: membership failed: %r", self.group, exc)
            self.on_failure(exc)

    async def _poll(self) -> None:
        # Partitions are paused as they come: getmany only keeps the membership alive.
        while True:
            await self._consumer.getmany(timeout_ms=1000)

    async def _revoked(self, partitions: set[int]) -> None:
        self.partitions -= partitions
        try:
            await self.on_revoked(partitions)
        except Exception as exc:  # noqa: BLE001 (reported, the worker stops)
            self.on_failure(exc)

    async def _assigned(self, assigned: set[KafkaTP]) -> None:
        self._consumer.pause(*assigned)
        partitions = {tp.partition for tp in assigned}
        self.partitions = partitions
        log.info("kafka: group %s assigned partitions %s", self.group, sorted(partitions))
        try:
            await self.on_assigned(partitions)
        except Exception as exc:  # noqa: BLE001 (reported, the worker stops)
            self.on_failure(exc)

    async def close(self) -> None:
        """Leave the group (its partitions move to the others at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._consumer.stop()
