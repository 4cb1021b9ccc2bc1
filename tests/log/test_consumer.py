"""Contract tests of the Consumer (and the Producer calls it depends on), written
against evd.core.log's roles and parametrized over the log backends.

Backends: the embedded log and the Kafka log (on the session's Tansu broker).
Everything backend-specific (how a producer or consumer is made, which sub-log
a writer's appends land in, how wake-ups, slow commits or a full disk are
simulated, the writer in another process) stays inside :class:`Backend`; a test
of something a backend does not have (e.g. writers' sub-logs or byte offsets in
Kafka) is skipped for it through ``Backend.require``, which says why.

Covered: fetch returns what was appended, per sub-log in offset order, only for
the assigned partitions, across writers and streams with different partition
counts; fetch waits for data without polling (same process and another
process, each with a negative control without wake-ups) and returns [] at its
timeout; sub-logs that appear after assign; seek (a boundary, inside a record,
past the end, to the beginning); commit/committed (durable, per partition,
concurrent commits serialized, names checked); end_offsets, backlog and lag in
bytes and seconds; append's offset; appends out of range refused whole;
admission when the disk is full.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer

from bench.tansu import Broker
from evd.config import Config
from evd.core.config import KafkaConfig, LogConfig
from evd.core.errors import LogOverloaded
from evd.core.log import (
    Consumer,
    ConsumerRecord,
    InvalidOffset,
    Lag,
    Producer,
    SubLog,
    TopicPartition,
    records,
)
from evd.core.log.embedded import consumer as consumer_mod
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.embedded.wake import Waker
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.kafka.producer import KafkaLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import DeadLetter

pytestmark = pytest.mark.workers_independent

#: Partitions of every stream but charts, which has CHARTS_PARTITIONS.
PARTITIONS = 4
CHARTS_PARTITIONS = 2
#: Small segments: a few records fill one, so reads cross segment boundaries.
SEGMENT_BYTES = 4096
#: A producer timestamp (epoch ms) the records below are stamped from.
T0_MS = 1_714_564_800_000
#: A fetch that should be woken waits up to WOKEN_TIMEOUT_S; woken, it returns within
#: WAKE_BOUND_S (milliseconds when idle, seconds on a busy machine), far sooner than a
#: fetch that only returns at its timeout. The negative controls wait CONTROL_TIMEOUT_S
#: and are told apart by returning no sooner than that, measured from the fetch's start.
WOKEN_TIMEOUT_S = 30.0
WAKE_BOUND_S = 10.0
CONTROL_TIMEOUT_S = 3.0


def payload(tag: str, ts_ms: int = T0_MS, pad: int = 0) -> bytes:
    """A tagged record (evd.core.log.records' header) that says ``tag``, ``pad`` bytes longer."""
    value = DeadLetter(received_at=ts_ms, index=0, error=tag + "." * pad, event=b"{}")
    return records.encode(Kind.DEAD_LETTER, ts_ms, value)


def tag_of(data: bytes) -> str:
    error: str = records.decode(data, "dead_letter").error
    return error.rstrip(".")


# -- backends -------------------------------------------------------------------------------

#: A writer in another process: appends ``before`` records, says "open", waits for a line
#: on stdin, appends the ``after`` records and prints their offsets. "nowake": it never
#: pokes readers (the negative control of the wake-up test).
EMBEDDED_WRITER = r"""
import asyncio, json, sys
from evd.core.log.embedded import producer as embedded, wake as sublog

data_dir, writer, wake, partitions, charts, seg = sys.argv[1:7]
before, after = json.loads(sys.argv[7]), json.loads(sys.argv[8])
if wake == "nowake":
    sublog.Waker.poke = lambda self: None

async def main():
    lg = embedded.EmbeddedLog(
        data_dir, int(partitions), writer=int(writer),
        stream_partitions={"charts": int(charts)}, segment_bytes=int(seg),
    )
    lg.open()
    for stream, partition, data in before:
        await lg.append(stream, partition, bytes.fromhex(data))
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    futs = [lg.append(stream, partition, bytes.fromhex(data)) for stream, partition, data in after]
    print(json.dumps(await asyncio.gather(*futs)), flush=True)
    await lg.close()

asyncio.run(main())
"""


class Target(NamedTuple):
    """Where to append so that records land in ``sublog``."""

    producer: Producer
    partition: int
    sublog: SubLog


class Backend:
    """Producers (writer k) and consumers (by name) of one log backend for one test;
    every one of them is closed after it.

    ``lacks``: what this backend does not have, each with why; a test that needs one
    of them calls :meth:`require` and is skipped for this backend, saying why.
    """

    name = ""
    #: A partition has a sub-log per writer (else one sub-log, source 0).
    sublog_per_writer = True
    #: lag() is exact: bytes between positions and ends, seconds from the oldest
    #: unconsumed record's producer timestamp (else an estimate, see KafkaConsumer).
    exact_lag = True
    lacks: ClassVar[Mapping[str, str]] = {}

    def __init__(self) -> None:
        self._producers: list[Producer] = []
        self._consumers: list[Consumer] = []

    def require(self, capability: str) -> None:
        """Skip the calling test for a backend without ``capability``."""
        why = self.lacks.get(capability)
        if why is not None:
            pytest.skip(f"{self.name} backend lacks {capability}: {why}")

    def sublog(self, stream: str, partition: int, writer: int) -> SubLog:
        """The sub-log that writer ``writer``'s appends to ``partition`` land in."""
        return SubLog(stream, partition, writer if self.sublog_per_writer else 0)

    def partitions_of(self, stream: str) -> int:
        return CHARTS_PARTITIONS if stream == Stream.CHARTS else PARTITIONS

    async def two_sublogs(self) -> tuple[list[Target], list[TopicPartition]]:
        """Two distinct sub-logs to append to, and the partitions that hold them: two
        writers' of Stream.RAW partition 0 where a partition has a sub-log per writer,
        else (Kafka) those of Stream.RAW partitions 0 and 1."""
        if self.sublog_per_writer:
            producers = [await self.producer(0), await self.producer(1)]
            targets = [Target(p, 0, SubLog(Stream.RAW, 0, w)) for w, p in enumerate(producers)]
        else:
            producer = await self.producer(0)
            targets = [Target(producer, p, SubLog(Stream.RAW, p, 0)) for p in (0, 1)]
        return targets, sorted({TopicPartition(Stream.RAW, t.partition) for t in targets})

    async def producer(self, writer: int = 0) -> Producer:
        """Writer ``writer``'s producer, started (streams: PARTITIONS, charts partitions_of)."""
        raise NotImplementedError

    def consumer(self, name: str | None, **kw: Any) -> Consumer:
        """Consumer ``name`` (``kw``: the backend's options, e.g. reset)."""
        raise NotImplementedError

    async def learn_ends(self, consumer: Consumer) -> None:
        """Let ``consumer`` learn the durable ends its lag() is measured against."""

    def slow_commits(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        """Commits take up to ``delay`` s more (a slow disk or broker), so that
        concurrent commits overlap."""
        raise NotImplementedError

    async def close(self) -> None:
        for c in self._consumers:
            await c.close()
        for p in self._producers:
            await p.close()


class EmbeddedBackend(Backend):
    """The embedded log under a test's tmp_path."""

    name = "embedded"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def producer(self, writer: int = 0) -> Producer:
        lg = EmbeddedLog(
            self.root, PARTITIONS, writer=writer, segment_bytes=SEGMENT_BYTES,
            stream_partitions={Stream.CHARTS: CHARTS_PARTITIONS},
        )
        await lg.start()
        self._producers.append(lg)
        return lg

    def consumer(self, name: str | None, **kw: Any) -> Consumer:
        c = EmbeddedConsumer(self.root, name, **kw)
        self._consumers.append(c)
        return c

    def set_disk_full(self, producer: Producer, full: bool) -> None:
        """What retention does when the log's disk cap is reached (or room again)."""
        assert isinstance(producer, EmbeddedLog)
        producer.disk_full = "test: the disk is full" if full else None

    def disable_wakeups(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Writers in this process stop telling waiting consumers about new data."""
        monkeypatch.setattr(Waker, "poke", lambda self: None)

    def slow_commits(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        """Every commit's write takes ``delay`` s more (a slow disk), so two commits overlap."""
        real = consumer_mod._write_offsets

        def slow(writes: list[tuple[Path, bytes]]) -> None:
            time.sleep(delay)
            real(writes)

        monkeypatch.setattr(consumer_mod, "_write_offsets", slow)

    def writer_process_argv(
        self, writer: int, before: Sequence[tuple[str, int, bytes]],
        after: Sequence[tuple[str, int, bytes]], wake: bool,
    ) -> list[str]:
        """argv of a writer in another process (see EMBEDDED_WRITER)."""
        return [
            sys.executable, "-c", EMBEDDED_WRITER, str(self.root), str(writer),
            "wake" if wake else "nowake", str(PARTITIONS), str(CHARTS_PARTITIONS),
            str(SEGMENT_BYTES),
            json.dumps([(s, p, d.hex()) for s, p, d in before]),
            json.dumps([(s, p, d.hex()) for s, p, d in after]),
        ]


class KafkaBackend(Backend):
    """The Kafka log on the session's Tansu broker, under a topic prefix of the test's own.

    Every writer's producer is a KafkaLog of its own; they all write the same
    partitions (a Kafka partition is one sub-log, source 0)."""

    name = "kafka"
    sublog_per_writer = False
    exact_lag = False
    lacks: ClassVar[Mapping[str, str]] = {
        "writer_sublogs": "a Kafka partition is one sub-log (source 0): writers share it, so"
        " there is no writer's sub-log to tell apart, to take turns with or to discover",
        "stream_partition_counts": "KafkaLog gives every stream's topic log.partitions"
        " partitions",
        "byte_offsets": "Kafka offsets count records (next_offset = offset + 1): no offset"
        " lies inside a record",
        "wakeup_switch": "a waiting fetch is the broker's long poll, not a wake-up this"
        " process sends: there is nothing to turn off for the negative control",
        "writer_process": "the writer in another process tests the embedded log's"
        " cross-process publication (durable-end files, inotify); to a Kafka broker"
        " another process's producer is just another client",
        "disk_full": "the Kafka log has no disk cap of its own (its bound,"
        " log.max_pending_bytes, is tested in test_kafka_log.py)",
        "name_checks": "consumer names become Kafka group ids ({topic_prefix}{name}), not"
        " file names: KafkaConsumer checks none",
        "fair_small_fetches": "KafkaConsumer.fetch is aiokafka's getmany, which drains one"
        " partition's buffered fetch response before the next partition's (not round-robin)",
    }

    def __init__(self, broker: Broker, prefix: str) -> None:
        super().__init__()
        self.cfg = Config(
            log=LogConfig(backend="kafka", partitions=PARTITIONS),
            kafka=KafkaConfig(
                bootstrap_servers=[broker.bootstrap], topic_prefix=prefix, idempotence=False
            ),
        )

    def partitions_of(self, stream: str) -> int:
        return PARTITIONS

    async def producer(self, writer: int = 0) -> Producer:
        lg = KafkaLog(self.cfg)
        self._producers.append(lg)
        await lg.start()
        return lg

    def consumer(self, name: str | None, **kw: Any) -> Consumer:
        assert not kw, f"KafkaConsumer takes no options {kw}"
        c = KafkaConsumer(self.cfg, name)
        self._consumers.append(c)
        return c

    async def learn_ends(self, consumer: Consumer) -> None:
        # lag() has no broker round trip: it measures against the ends last learned.
        await consumer.end_offsets()

    def slow_commits(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        """Each commit request waits before it is sent, the first longest: commits
        that were not serialized would reach the broker in reverse call order."""
        real = AIOKafkaConsumer.commit
        calls = itertools.count()

        async def slow(self: AIOKafkaConsumer, offsets: Any = None) -> None:
            await asyncio.sleep(delay / (1 + next(calls)))
            await real(self, offsets)

        monkeypatch.setattr(AIOKafkaConsumer, "commit", slow)


@pytest.fixture(params=["embedded", "kafka"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b: Backend
    if request.param == "kafka":
        b = KafkaBackend(
            request.getfixturevalue("kafka_broker"), request.getfixturevalue("kafka_prefix")
        )
    else:
        b = EmbeddedBackend(tmp_path)
    try:
        yield b
    finally:
        await b.close()


# -- helpers -------------------------------------------------------------------------------


async def append_many(
    producer: Producer, items: Sequence[tuple[str, int, bytes]]
) -> list[int]:
    """Append each (stream, partition, payload); their offsets once durable."""
    return list(await asyncio.gather(*(producer.append(s, p, d) for s, p, d in items)))


async def fetch_n(
    consumer: Consumer, count: int, *, max_bytes: int = 1 << 20, timeout: float = 20.0
) -> list[ConsumerRecord]:
    """Fetch until ``count`` records came (bounded in time), then check that no more come."""
    out: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(out)} of {count} records within {timeout} s")
        out += await consumer.fetch(max_bytes, timeout=min(left, 1.0))
    assert len(out) == count, f"{len(out)} records fetched, {count} expected"
    assert await consumer.fetch(max_bytes, timeout=0.05) == []
    return out


def by_sublog(fetched: Sequence[ConsumerRecord]) -> dict[SubLog, list[ConsumerRecord]]:
    out: dict[SubLog, list[ConsumerRecord]] = defaultdict(list)
    for r in fetched:
        out[r.sublog].append(r)
    return dict(out)


def check_chained(recs: Sequence[ConsumerRecord], start: int = 0) -> None:
    """Records of one sub-log: in offset order, each where the one before ends."""
    expected = start
    for r in recs:
        assert r.offset == expected
        assert r.next_offset > r.offset
        expected = r.next_offset


async def timed(coro: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


# -- fetch: what was appended ------------------------------------------------------------------


async def test_fetch_returns_what_was_appended_per_sublog_in_offset_order(
    backend: Backend,
) -> None:
    producers = [await backend.producer(0), await backend.producer(1)]
    targets = [(Stream.RAW, p) for p in range(PARTITIONS)] + [(Stream.CHARTS, p) for p in range(2)]
    appended: dict[SubLog, list[tuple[int, bytes]]] = defaultdict(list)
    for i in range(12):  # both writers interleaved, several segments each
        for w, producer in enumerate(producers):
            items = [(s, p, payload(f"{w}/{s}/{p}/{i}", pad=200)) for s, p in targets]
            for (s, p, data), offset in zip(items, await append_many(producer, items), strict=True):
                appended[backend.sublog(s, p, w)].append((offset, data))
    consumer = backend.consumer("contract")
    assigned = {TopicPartition(Stream.RAW, 1), TopicPartition(Stream.CHARTS, 1)}
    consumer.assign(assigned)
    assert consumer.assignment() == assigned

    fetched = by_sublog(await fetch_n(consumer, 12 * 2 * 2))

    want = {s for s in appended if (s.stream, s.partition) in assigned}
    # Embedded: each writer's sub-log of each partition; Kafka: one sub-log per partition.
    assert set(fetched) == want == {
        backend.sublog(s, p, w) for s, p in assigned for w in (0, 1)
    }
    for sublog, recs in fetched.items():
        assert [(r.offset, r.payload) for r in recs] == appended[sublog]
        check_chained(recs)
        if backend.sublog_per_writer:
            assert all(tag_of(r.payload).startswith(f"{sublog.source}/") for r in recs)
    assert consumer.positions() == {s: recs[-1].next_offset for s, recs in fetched.items()}


async def test_a_stream_has_its_own_partition_count(backend: Backend) -> None:
    backend.require("stream_partition_counts")
    producer = await backend.producer(0)
    await producer.append(Stream.RAW, PARTITIONS - 1, payload("raw"))
    with pytest.raises(ValueError):
        producer.append(Stream.CHARTS, CHARTS_PARTITIONS, payload("charts"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, PARTITIONS - 1)])
    assert [r.sublog for r in await fetch_n(consumer, 1)] == [SubLog(Stream.RAW, PARTITIONS - 1, 0)]


async def test_an_append_out_of_range_is_refused_at_once_and_whole(backend: Backend) -> None:
    producer = await backend.producer(0)
    good, bad = (Stream.RAW, 0, payload("in range")), (Stream.RAW, PARTITIONS, payload("out of range"))
    with pytest.raises(ValueError):
        producer.append_all([good, bad])
    with pytest.raises(ValueError):
        producer.append_all([good, (Stream.RAW, -1, payload("negative"))], internal=True)
    with pytest.raises(ValueError):
        producer.append(Stream.CHARTS, backend.partitions_of(Stream.CHARTS), payload("charts"))
    await producer.flush()
    await producer.append(Stream.RAW, 0, payload("after"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    # Nothing of the refused requests was queued, not even their records in range.
    assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["after"]


async def test_assign_replaces_the_assignment(backend: Backend) -> None:
    producer = await backend.producer(0)
    await append_many(producer, [(Stream.RAW, p, payload(f"p{p}")) for p in range(PARTITIONS)])
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 1)])
    assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["p1"]
    consumer.assign([TopicPartition(Stream.RAW, 2), TopicPartition(Stream.RAW, 3)])
    assert sorted(tag_of(r.payload) for r in await fetch_n(consumer, 2)) == ["p2", "p3"]
    await producer.append(Stream.RAW, 1, payload("late p1"))
    assert await consumer.fetch(timeout=0.3) == []  # partition 1 is no longer assigned


async def test_small_fetches_take_turns_between_sublogs_and_lose_nothing(
    backend: Backend,
) -> None:
    targets, partitions = await backend.two_sublogs()
    for w, t in enumerate(targets):
        await append_many(
            t.producer, [(Stream.RAW, t.partition, payload(f"{w}-{i}", pad=100)) for i in range(20)]
        )
    consumer = backend.consumer(None)
    consumer.assign(partitions)
    batches = []
    for _ in range(200):  # bounded: each fetch returns at least one record while any is left
        got = await consumer.fetch(max_bytes=1, timeout=0.2)
        if not got:
            break
        batches.append(got)
    fetched = by_sublog([r for b in batches for r in b])
    assert set(fetched) == {t.sublog for t in targets}
    for w, t in enumerate(targets):
        recs = fetched[t.sublog]
        assert [tag_of(r.payload) for r in recs] == [f"{w}-{i}" for i in range(20)]
        check_chained(recs)
    backend.require("fair_small_fetches")
    # Neither sub-log waits for the other to be drained.
    assert {r.sublog for b in batches[:4] for r in b} == {t.sublog for t in targets}


async def test_append_returns_the_offset_the_consumer_sees(backend: Backend) -> None:
    producer = await backend.producer(0)
    offsets = [await producer.append(Stream.RAW, 2, payload(f"r{i}", pad=i * 50)) for i in range(10)]
    assert offsets == sorted(set(offsets))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 2)])
    fetched = await fetch_n(consumer, 10)
    assert [r.offset for r in fetched] == offsets
    assert [tag_of(r.payload) for r in fetched] == [f"r{i}" for i in range(10)]


# -- fetch: waiting ---------------------------------------------------------------------------


@pytest.mark.parametrize("wake", [True, False], ids=["woken", "negative-control-no-wakeups"])
async def test_fetch_waits_for_an_append_without_polling(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, wake: bool
) -> None:
    if not wake:
        backend.require("wakeup_switch")
    producer = await backend.producer(0)
    await producer.append(Stream.RAW, 0, payload("first"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    assert len(await fetch_n(consumer, 1)) == 1
    if not wake:
        assert isinstance(backend, EmbeddedBackend)
        backend.disable_wakeups(monkeypatch)
    timeout = WOKEN_TIMEOUT_S if wake else CONTROL_TIMEOUT_S
    started = time.monotonic()
    fetching = asyncio.ensure_future(consumer.fetch(timeout=timeout))
    await asyncio.sleep(0.3)  # the fetch found nothing and waits
    assert not fetching.done()
    appended_at = time.monotonic()
    await producer.append(Stream.RAW, 0, payload("second"))
    got = await asyncio.wait_for(fetching, timeout + 5)
    waited = time.monotonic() - appended_at
    print(f"fetch returned {waited:.3f} s after the append")
    # Woken: at once. Without wake-ups the data is there but the fetch only
    # finds it at its timeout: this is what a polling-free wait must beat.
    assert [tag_of(r.payload) for r in got] == ["second"]
    if wake:
        assert waited < WAKE_BOUND_S
    else:
        assert time.monotonic() - started >= CONTROL_TIMEOUT_S - 0.1


@pytest.mark.parametrize("has_sublog", [True, False], ids=["at-the-end", "no-sublog-yet"])
async def test_fetch_with_nothing_to_read_returns_empty_after_its_timeout(
    backend: Backend, has_sublog: bool
) -> None:
    producer = await backend.producer(0)
    if has_sublog:
        await producer.append(Stream.RAW, 0, payload("only"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    if has_sublog:
        await fetch_n(consumer, 1)
    got, elapsed = await timed(consumer.fetch(timeout=0.5))
    assert got == []
    assert 0.45 <= elapsed < 0.5 + WAKE_BOUND_S


@pytest.mark.parametrize("wake", [True, False], ids=["woken", "negative-control-no-wakeups"])
async def test_a_writer_in_another_process_wakes_a_waiting_fetch(
    backend: Backend, wake: bool
) -> None:
    backend.require("writer_process")
    assert isinstance(backend, EmbeddedBackend)
    before = [(Stream.RAW, 1, payload("before"))]
    after = [(Stream.RAW, 1, payload(f"after-{i}")) for i in range(3)]
    proc = await asyncio.create_subprocess_exec(
        *backend.writer_process_argv(5, before, after, wake),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"open\n"
        consumer = backend.consumer(None)
        consumer.assign([TopicPartition(Stream.RAW, 1)])
        # The writer's sub-log exists already: this is about waking, not discovery.
        assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["before"]
        timeout = WOKEN_TIMEOUT_S if wake else CONTROL_TIMEOUT_S
        started = time.monotonic()
        fetching = asyncio.ensure_future(consumer.fetch(timeout=timeout))
        await asyncio.sleep(0.3)
        assert not fetching.done()
        told_at = time.monotonic()
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        offsets = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        got = await asyncio.wait_for(fetching, timeout + 5)
        waited = time.monotonic() - told_at
        returned_after = time.monotonic() - started
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    print(f"fetch returned {waited:.3f} s after the writer was told to append")
    got += await fetch_n(consumer, 3 - len(got))
    assert [tag_of(r.payload) for r in got] == ["after-0", "after-1", "after-2"]
    assert [r.offset for r in got] == offsets
    assert {r.sublog for r in got} == {SubLog(Stream.RAW, 1, 5)}
    if wake:
        assert waited < WAKE_BOUND_S
    else:
        assert returned_after >= CONTROL_TIMEOUT_S - 0.1


async def test_a_sublog_that_appears_after_assign_is_found_at_once(backend: Backend) -> None:
    backend.require("writer_sublogs")
    first = await backend.producer(0)
    await first.append(Stream.RAW, 3, payload("w0"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 3)])
    assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["w0"]
    fetching = asyncio.ensure_future(consumer.fetch(timeout=WOKEN_TIMEOUT_S))
    await asyncio.sleep(0.05)
    # Writer 1 appends to this partition for the first time: a new sub-log.
    second = await backend.producer(1)
    appended_at = time.monotonic()
    await second.append(Stream.RAW, 3, payload("w1"))
    got = await asyncio.wait_for(fetching, WOKEN_TIMEOUT_S + 5)
    waited = time.monotonic() - appended_at
    assert [(r.sublog, tag_of(r.payload)) for r in got] == [(SubLog(Stream.RAW, 3, 1), "w1")]
    assert waited < WAKE_BOUND_S, f"the new sub-log was found only after {waited:.2f} s"


# -- seek ----------------------------------------------------------------------------------------


async def appended_sublog(
    backend: Backend, count: int = 10, partition: int = 0
) -> tuple[Consumer, SubLog, list[ConsumerRecord]]:
    """A consumer of a partition that writer 0 appended ``count`` records to, read once."""
    producer = await backend.producer(0)
    await append_many(
        producer, [(Stream.RAW, partition, payload(f"r{i}", pad=300)) for i in range(count)]
    )
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, partition)])
    fetched = await fetch_n(consumer, count)
    return consumer, SubLog(Stream.RAW, partition, 0), fetched


async def test_seek_to_a_record_boundary_reads_again_from_there(backend: Backend) -> None:
    consumer, sublog, fetched = await appended_sublog(backend)
    for i in (6, 0, 9, 3):
        consumer.seek(sublog, fetched[i].offset)
        again = await fetch_n(consumer, 10 - i)
        assert [(r.offset, r.payload) for r in again] == [
            (r.offset, r.payload) for r in fetched[i:]
        ]
    consumer.seek(sublog, fetched[-1].next_offset)  # the end: nothing to read, no error
    assert await consumer.fetch(timeout=0.1) == []


async def test_seek_inside_a_record_raises_from_fetch(backend: Backend) -> None:
    backend.require("byte_offsets")
    consumer, sublog, fetched = await appended_sublog(backend, count=3)
    record = fetched[1]
    for offset in range(record.offset + 1, record.next_offset):
        consumer.seek(sublog, offset)
        with pytest.raises(InvalidOffset):
            await consumer.fetch(timeout=0.1)
    # A boundary again, and all is well.
    consumer.seek(sublog, record.offset)
    assert [r.payload for r in await fetch_n(consumer, 2)] == [r.payload for r in fetched[1:]]


async def test_seek_past_the_durable_end_raises(backend: Backend) -> None:
    consumer, sublog, fetched = await appended_sublog(backend, count=3)
    end = (await consumer.end_offsets())[sublog]
    assert end == fetched[-1].next_offset
    for offset in (end + 1, end + 10_000):
        consumer.seek(sublog, offset)
        with pytest.raises(InvalidOffset):
            await consumer.fetch(timeout=0.1)
    with pytest.raises(InvalidOffset):
        consumer.seek(sublog, -1)


async def test_seek_to_beginning_reads_everything_again(backend: Backend) -> None:
    consumer, sublog, fetched = await appended_sublog(backend, count=12)
    consumer.seek_to_beginning(sublog)
    # The oldest retained record (0 here), or not known yet: Kafka asks the broker at the next fetch.
    assert consumer.positions().get(sublog, 0) == 0
    assert [r.payload for r in await fetch_n(consumer, 12)] == [r.payload for r in fetched]
    assert consumer.positions()[sublog] == fetched[-1].next_offset


async def test_a_seek_before_the_sublog_exists_applies_when_it_appears(backend: Backend) -> None:
    producer = await backend.producer(0)
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    offsets = await append_many(producer, [(Stream.RAW, 0, payload(f"r{i}")) for i in range(4)])
    # Seek before the consumer looked for the sub-log again.
    consumer.seek(SubLog(Stream.RAW, 0, 0), offsets[2])
    got, waited = await timed(consumer.fetch(timeout=WOKEN_TIMEOUT_S))
    assert [r.offset for r in got] == offsets[2:]
    assert waited < WAKE_BOUND_S


# -- commits -------------------------------------------------------------------------------------


async def test_commit_and_committed_survive_a_new_consumer_per_partition(
    backend: Backend,
) -> None:
    producers = [await backend.producer(0), await backend.producer(1)]
    for w, producer in enumerate(producers):
        await append_many(producer, [(Stream.RAW, p, payload(f"{w}{p}")) for p in (0, 1) for _ in "ab"])
    first = backend.consumer("sink-a")
    first.assign([TopicPartition(Stream.RAW, 0), TopicPartition(Stream.RAW, 1)])
    assert await first.committed() == {}
    await fetch_n(first, 8)
    await first.commit()  # the positions
    positions = first.positions()
    assert set(positions) == {backend.sublog(Stream.RAW, p, w) for p in (0, 1) for w in (0, 1)}
    assert await first.committed() == positions
    explicit = {SubLog(Stream.RAW, 1, 0): positions[SubLog(Stream.RAW, 1, 0)] // 2}
    await first.commit(explicit)
    after = positions | explicit
    assert await first.committed() == after
    await first.close()

    again = backend.consumer("sink-a")
    # committed() covers the assigned partitions only.
    again.assign([TopicPartition(Stream.RAW, 1)])
    assert await again.committed() == {s: o for s, o in after.items() if s.partition == 1}
    again.assign([TopicPartition(Stream.RAW, 0), TopicPartition(Stream.RAW, 1)])
    assert await again.committed() == after
    other = backend.consumer("sink-b")  # another name: its own offsets
    other.assign([TopicPartition(Stream.RAW, 0), TopicPartition(Stream.RAW, 1)])
    assert await other.committed() == {}


async def test_a_consumer_starts_at_its_committed_offsets(backend: Backend) -> None:
    """Like aiokafka's group consumer: committed offsets first, else the oldest record."""
    producer = await backend.producer(0)
    await append_many(producer, [(Stream.RAW, 0, payload(f"c{i}")) for i in range(4)])
    first = backend.consumer("resumer")
    first.assign([TopicPartition(Stream.RAW, 0)])
    got = await fetch_n(first, 4)
    await first.commit({got[1].sublog: got[1].next_offset})  # consumed two of four
    await first.close()
    again = backend.consumer("resumer")
    again.assign([TopicPartition(Stream.RAW, 0)])
    assert [tag_of(r.payload) for r in await fetch_n(again, 2)] == ["c2", "c3"]
    fresh = backend.consumer("newcomer")
    fresh.assign([TopicPartition(Stream.RAW, 0)])
    assert len(await fetch_n(fresh, 4)) == 4


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["fast-disk", "slow-disk"])
async def test_concurrent_commits_of_one_consumer_both_survive(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, delay: float
) -> None:
    targets, partitions = await backend.two_sublogs()
    for t in targets:
        await t.producer.append(Stream.RAW, t.partition, payload("x", pad=40))
    consumer = backend.consumer("processor")
    consumer.assign(partitions)
    await fetch_n(consumer, 2)
    a, b = (t.sublog for t in targets)
    # A slow disk makes the two commits overlap: each must merge into what the
    # other wrote rather than overwrite it.
    backend.slow_commits(monkeypatch, delay)
    await asyncio.gather(consumer.commit({a: 10}), consumer.commit({b: 20}))
    assert await consumer.committed() == {a: 10, b: 20}
    await asyncio.gather(consumer.commit({b: 30}), consumer.commit({a: 40}), consumer.commit({b: 50}))
    assert await consumer.committed() == {a: 40, b: 50}  # in call order


@pytest.mark.parametrize("name", ["", "a/b", "..", "a b", "x\n", "sink.1"])
async def test_consumer_names_are_checked(backend: Backend, name: str) -> None:
    backend.require("name_checks")
    with pytest.raises(ValueError):
        backend.consumer(name)


async def test_consumer_names_of_letters_digits_dashes_underscores_are_accepted(
    backend: Backend,
) -> None:
    assert backend.consumer("Sink_2-b") is not None


async def test_an_anonymous_consumer_cannot_commit(backend: Backend) -> None:
    await (await backend.producer(0)).append(Stream.RAW, 0, payload("x"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    await fetch_n(consumer, 1)
    with pytest.raises(RuntimeError):
        await consumer.commit()
    assert await consumer.committed() == {}


# -- end offsets, backlog, lag -------------------------------------------------------------------


async def test_end_offsets_backlog_and_lag_in_bytes_and_seconds(backend: Backend) -> None:
    targets, partitions = await backend.two_sublogs()
    # Sub-log 0's records were produced at T0, T0+1 s, ...; sub-log 1's from T0+0.5 s.
    stamps = {0: [T0_MS + 1000 * i for i in range(5)], 1: [T0_MS + 500 + 1000 * i for i in range(5)]}
    offsets: dict[int, list[int]] = {}
    for w, t in enumerate(targets):
        items = [(Stream.RAW, t.partition, payload(f"{w}-{i}", ts, pad=100)) for i, ts in enumerate(stamps[w])]
        offsets[w] = await append_many(t.producer, items)
    s0, s1 = (t.sublog for t in targets)
    consumer = backend.consumer(None)
    consumer.assign(partitions)
    ends = await consumer.end_offsets()
    assert set(ends) == {s0, s1}
    assert consumer.backlog() == {s0, s1}
    now = T0_MS / 1000 + 60.0
    # Exact: the bytes behind and the age of the oldest record (writer 0's first).
    # Kafka's is an estimate (records behind times their mean size; the broker's
    # timestamp of the last record read, none before a fetch): only how it moves is checked.
    lag = consumer.lag(now=now)
    if backend.exact_lag:
        assert lag == Lag(ends[s0] + ends[s1], 60.0)
    assert lag.bytes > 0

    consumer.seek(s0, offsets[0][3])
    consumer.seek(s1, offsets[1][1])
    # Oldest unconsumed: sub-log 1's record 1 (T0+1.5 s), not sub-log 0's record 3 (T0+3 s).
    before, lag = lag, consumer.lag(now=now)
    if backend.exact_lag:
        assert lag.bytes == ends[s0] - offsets[0][3] + ends[s1] - offsets[1][1]
        assert lag.seconds == pytest.approx(60.0 - 1.5)
    assert 0 < lag.bytes < before.bytes

    consumer.seek(s1, ends[s1])
    assert consumer.backlog() == {s0}
    before, lag = lag, consumer.lag(now=now)
    if backend.exact_lag:
        assert lag.bytes == ends[s0] - offsets[0][3]
        assert lag.seconds == pytest.approx(60.0 - 3.0)
    assert 0 < lag.bytes < before.bytes

    assert len(await fetch_n(consumer, 2)) == 2
    assert consumer.backlog() == set()
    assert consumer.lag(now=now) == Lag(0, 0.0)
    assert consumer.lag() == Lag(0, 0.0)
    # The ends are exact: where reading stops (Kafka: the offset after the last record).
    assert consumer.positions() == ends
    if not backend.sublog_per_writer:
        assert ends == {s0: offsets[0][-1] + 1, s1: offsets[1][-1] + 1}

    await targets[1].producer.append(Stream.RAW, targets[1].partition, payload("new", T0_MS + 10_000))
    ends2 = await consumer.end_offsets()
    assert ends2[s0] == ends[s0] and ends2[s1] > ends[s1]
    assert consumer.backlog() == {s1}
    lag = consumer.lag(now=now)
    if backend.exact_lag:
        assert lag.bytes == ends2[s1] - ends[s1]
        assert lag.seconds == pytest.approx(50.0)
    else:
        assert lag.bytes > 0 and 0.0 <= consumer.lag().seconds < 60.0


async def test_lag_counts_records_produced_now_as_almost_zero_seconds(backend: Backend) -> None:
    producer = await backend.producer(0)
    await producer.append(Stream.RAW, 0, payload("now", time.time_ns() // 1_000_000))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    await backend.learn_ends(consumer)
    lag = consumer.lag()
    assert lag.bytes > 0 and 0.0 <= lag.seconds < 5.0


# -- producer admission --------------------------------------------------------------------------


async def test_a_full_disk_refuses_every_append_except_internal_ones(backend: Backend) -> None:
    backend.require("disk_full")
    assert isinstance(backend, EmbeddedBackend)
    producer = await backend.producer(0)
    await producer.append(Stream.RAW, 0, payload("before"))
    consumer = backend.consumer(None)
    consumer.assign([TopicPartition(Stream.RAW, 0), TopicPartition(Stream.RAW, 1)])
    await fetch_n(consumer, 1)
    ends = await consumer.end_offsets()
    assert not producer.overloaded

    backend.set_disk_full(producer, True)
    assert producer.overloaded and producer.writable
    batch = [(Stream.RAW, 0, payload("a")), (Stream.RAW, 1, payload("b")), (Stream.RAW, 0, payload("c"))]
    with pytest.raises(LogOverloaded):
        producer.append_all(batch)
    with pytest.raises(LogOverloaded):
        producer.append(Stream.RAW, 0, payload("d"))
    await producer.flush()
    assert await consumer.end_offsets() == ends  # none of them was queued
    assert await consumer.fetch(timeout=0.2) == []

    # A stage's outputs are what lets retention free the disk: never refused.
    await producer.append_all(batch, internal=True)
    await producer.append(Stream.RAW, 1, payload("e"), internal=True)
    got = await fetch_n(consumer, 4)
    assert sorted(tag_of(r.payload) for r in got) == ["a", "b", "c", "e"]

    backend.set_disk_full(producer, False)
    assert not producer.overloaded
    await producer.append(Stream.RAW, 0, payload("after"))
    assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["after"]



async def test_the_embedded_consumer_lists_sublog_directories_only_when_a_writer_announced_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discovery is a stat of ``_sublogs`` while no writer opened a sub-log, so a
    busy consumer does not list directories every DISCOVER_INTERVAL_S."""
    listings: list[tuple[str, int]] = []
    real = consumer_mod.writers_of

    def counted(data_dir: str | Path, stream: str, partition: int) -> list[int]:
        listings.append((stream, partition))
        return real(data_dir, stream, partition)

    monkeypatch.setattr(consumer_mod, "writers_of", counted)
    monkeypatch.setattr(consumer_mod, "DISCOVER_INTERVAL_S", 0.0)
    first = EmbeddedLog(tmp_path, 4, writer=0)
    first.open()
    second = EmbeddedLog(tmp_path, 4, writer=1)
    second.open()
    consumer = EmbeddedConsumer(tmp_path, None)
    try:
        await first.append(Stream.RAW, 2, payload("w0-0"))
        consumer.assign([TopicPartition(Stream.RAW, 2)])
        assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == ["w0-0"]
        listed = len(listings)
        for i in range(1, 20):
            await first.append(Stream.RAW, 2, payload(f"w0-{i}"))
            assert [tag_of(r.payload) for r in await fetch_n(consumer, 1)] == [f"w0-{i}"]
        assert len(listings) == listed, "listed directories though no writer opened a sub-log"
        await second.append(Stream.RAW, 2, payload("w1-0"))  # writer 1's first: announced
        got = await fetch_n(consumer, 1)
        assert [(r.sublog, tag_of(r.payload)) for r in got] == [(SubLog(Stream.RAW, 2, 1), "w1-0")]
        assert len(listings) == listed + 1
    finally:
        await consumer.close()
        await first.close()
        await second.close()
