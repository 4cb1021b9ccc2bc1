"""KafkaLog (the Producer of ``log.backend: kafka``) at its edges, on a real
Kafka-protocol broker (Tansu, see bench.tansu).

Covered: an append_all's future completes only once the broker acknowledged
its records, which are then readable; a broker that does not answer fails an
append with LogUnavailable within ``kafka.ack_timeout_s``, after which appends
are refused at once for ``kafka.unavailable_s`` and go through again once it
answers (same KafkaLog, no restart); ``log.max_pending_bytes`` bounds the bytes
waiting for acknowledgement (LogOverloaded) but not a stage's internal appends;
records are keyed by their partition number and carry the payload unchanged.

A broker is made unresponsive by freezing its process (SIGSTOP; SIGCONT always
follows): the tests that do so start a broker of their own, so the session's
shared broker is never frozen under other tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from evdtest import freeze

from bench.tansu import Broker
from evd.config import Config
from evd.core.config import KafkaConfig, LogConfig
from evd.core.errors import LogOverloaded, LogUnavailable
from evd.core.log import Append, SubLog, TopicPartition
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.kafka.producer import KafkaLog
from evd.core.log.kafka.topics import topic_name
from evd.core.log.streams import Stream

pytestmark = pytest.mark.workers_independent

PARTITIONS = 4
#: Bound of every wait for the broker that should succeed.
WAIT_S = 15.0


def config(
    broker: Broker, prefix: str, *, max_pending_bytes: int = 64 << 20, **kafka: Any
) -> Config:
    return Config(
        log=LogConfig(backend="kafka", partitions=PARTITIONS, max_pending_bytes=max_pending_bytes),
        kafka=KafkaConfig(
            bootstrap_servers=[broker.bootstrap], topic_prefix=prefix, idempotence=False, **kafka
        ),
    )


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, on a free port (the test freezes it)."""
    broker = Broker(log_path=tmp_path / "broker.log")
    broker.start()
    try:
        yield broker
    finally:
        if broker.proc is not None:
            os.kill(broker.proc.pid, signal.SIGCONT)  # never left frozen
        broker.stop()


@contextmanager
def frozen(broker: Broker) -> Iterator[None]:
    """The broker's process stopped (it answers nothing), continued on exit whatever happens."""
    assert broker.proc is not None
    freeze(broker.proc.pid)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


@pytest.fixture
async def logs() -> AsyncIterator[list[KafkaLog]]:
    """Started KafkaLogs of a test (see ``started``), closed after it."""
    made: list[KafkaLog] = []
    try:
        yield made
    finally:
        for lg in made:
            await asyncio.wait_for(lg.close(), WAIT_S)


async def started(logs: list[KafkaLog], cfg: Config) -> KafkaLog:
    """A started KafkaLog that appended once already (metadata known, connection up)."""
    lg = KafkaLog(cfg)
    logs.append(lg)
    await asyncio.wait_for(lg.start(), WAIT_S)
    await asyncio.wait_for(lg.append(Stream.RAW, 0, b"warm-up"), WAIT_S)
    return lg


async def read_back(
    broker: Broker, cfg: Config, streams: Sequence[str], count: int,
    partitions: Sequence[int] = range(PARTITIONS),
) -> dict[tuple[str, int], list[Any]]:
    """``count`` records of ``partitions`` of ``streams`` read with a plain aiokafka
    consumer (bounded in time): (stream, partition) -> its ConsumerRecords in order."""
    topics = {topic_name(cfg.kafka, s): s for s in streams}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await asyncio.wait_for(consumer.start(), WAIT_S)
    try:
        consumer.assign([KafkaTP(t, p) for t in topics for p in partitions])
        out: dict[tuple[str, int], list[Any]] = {}
        got = 0
        deadline = time.monotonic() + WAIT_S
        while got < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {got} of {count} records within {WAIT_S} s"
            batches = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000))
            for tp, messages in batches.items():
                out.setdefault((topics[tp.topic], tp.partition), []).extend(messages)
                got += len(messages)
        assert got == count
        return out
    finally:
        await consumer.stop()


async def test_append_all_completes_once_acknowledged_and_readable(
    own_broker: Broker, logs: list[KafkaLog], kafka_prefix: str
) -> None:
    cfg = config(own_broker, kafka_prefix, ack_timeout_s=10.0)
    lg = await started(logs, cfg)
    records: list[Append] = [(Stream.RAW, p, f"r{p}-{i}".encode()) for p in range(PARTITIONS) for i in range(3)]
    with frozen(own_broker):
        fut = lg.append_all(records)
        await asyncio.sleep(1.0)
        # Nothing can have acknowledged them: the future waits (and has not failed).
        assert not fut.done()
        assert lg.pending_bytes == sum(len(d) for _, _, d in records)
    await asyncio.wait_for(fut, WAIT_S)
    assert lg.pending_bytes == 0
    # Readable as soon as the future is done: the ends already count them.
    reader = KafkaConsumer(cfg, None)
    try:
        reader.assign(TopicPartition(Stream.RAW, p) for p in range(PARTITIONS))
        ends = await asyncio.wait_for(reader.end_offsets(), WAIT_S)
    finally:
        await reader.close()
    warm = 1  # the warm-up record of partition 0
    assert ends == {SubLog(Stream.RAW, p, 0): 3 + (warm if p == 0 else 0) for p in range(PARTITIONS)}
    got = await read_back(own_broker, cfg, [Stream.RAW], len(records) + warm)
    for p in range(PARTITIONS):
        values = [m.value for m in got[(Stream.RAW, p)] if m.value != b"warm-up"]
        assert values == [f"r{p}-{i}".encode() for i in range(3)]


async def test_an_unanswered_append_fails_then_refuses_at_once_then_recovers(
    own_broker: Broker, logs: list[KafkaLog], kafka_prefix: str
) -> None:
    ack_timeout, unavailable = 1.5, 4.0
    cfg = config(own_broker, kafka_prefix, ack_timeout_s=ack_timeout, unavailable_s=unavailable)
    lg = await started(logs, cfg)
    with frozen(own_broker):
        fut = lg.append_all([(Stream.RAW, 1, b"never acknowledged")])
        began = time.monotonic()
        with pytest.raises(LogUnavailable):
            await asyncio.wait_for(fut, ack_timeout + WAIT_S)
        failed_at = time.monotonic()
        failed_after = failed_at - began
        print(f"the append failed after {failed_after:.2f} s")
        # Not before ack_timeout_s; the upper bound only says that it did not hang.
        assert ack_timeout - 0.1 <= failed_after < ack_timeout + 5.0
        assert lg.pending_bytes == 0 and lg.writable
        # Now refused at once: raised by the call itself (not awaited), nothing queued,
        # for unavailable_s from the failure, which came no sooner than ack_timeout_s
        # after `began` (and no later than failed_at): checked until a little before
        # the earliest end of the refusal, at least once however slow the machine.
        refused_until = began + ack_timeout + unavailable - 0.3
        checks = 0
        while checks == 0 or time.monotonic() < refused_until:
            with pytest.raises(LogUnavailable):
                lg.append_all([(Stream.RAW, 2, b"refused")])
            with pytest.raises(LogUnavailable):
                lg.append(Stream.RAW, 2, b"refused")
            assert lg.pending_bytes == 0
            checks += 1
            await asyncio.sleep(0.2)
    # The broker answers again: once the refusal period is over, the same log appends.
    await asyncio.sleep(max(0.0, failed_at + unavailable + 0.1 - time.monotonic()))
    await asyncio.wait_for(lg.append_all([(Stream.RAW, 3, b"after")]), WAIT_S)
    offset = await asyncio.wait_for(lg.append(Stream.RAW, 3, b"after, again"), WAIT_S)
    assert offset == 1
    # (The unacknowledged record may have been written late: it is not looked for.)
    got = await read_back(own_broker, cfg, [Stream.RAW], 2, partitions=[3])
    assert [m.value for m in got[(Stream.RAW, 3)]] == [b"after", b"after, again"]


async def test_max_pending_bytes_refuses_edge_appends_but_not_internal_ones(
    own_broker: Broker, logs: list[KafkaLog], kafka_prefix: str
) -> None:
    cfg = config(own_broker, kafka_prefix, max_pending_bytes=1000, ack_timeout_s=10.0)
    lg = await started(logs, cfg)
    assert not lg.overloaded
    with frozen(own_broker):
        # One request is admitted whatever its size; it waits for the frozen broker.
        first = lg.append_all([(Stream.RAW, 0, b"a" * 700), (Stream.RAW, 1, b"b" * 500)])
        assert lg.pending_bytes == 1200 and lg.overloaded
        # Refused in the same turn of the loop, before the first one's task ever ran ...
        with pytest.raises(LogOverloaded):
            lg.append_all([(Stream.RAW, 2, b"c")])
        await asyncio.sleep(0.3)
        # ... and while it waits.
        with pytest.raises(LogOverloaded):
            lg.append_all([(Stream.RAW, 2, b"c")])
        with pytest.raises(LogOverloaded):
            lg.append(Stream.RAW, 2, b"c")
        # A stage's outputs are admitted all the same.
        internal = lg.append_all([(Stream.RAW, 3, b"d" * 600)], internal=True)
        assert lg.pending_bytes == 1800
        assert not first.done() and not internal.done()
    await asyncio.wait_for(asyncio.gather(first, internal), WAIT_S)
    assert lg.pending_bytes == 0 and not lg.overloaded
    await asyncio.wait_for(lg.append_all([(Stream.RAW, 2, b"c")]), WAIT_S)
    got = await read_back(own_broker, cfg, [Stream.RAW], 5)
    assert {k: [m.value for m in v] for k, v in got.items()} == {
        (Stream.RAW, 0): [b"warm-up", b"a" * 700],
        (Stream.RAW, 1): [b"b" * 500],
        (Stream.RAW, 2): [b"c"],
        (Stream.RAW, 3): [b"d" * 600],
    }


async def test_records_are_keyed_by_partition_and_carry_the_payload_unchanged(
    kafka_broker: Broker, logs: list[KafkaLog], kafka_prefix: str
) -> None:
    cfg = config(kafka_broker, kafka_prefix)
    lg = await started(logs, cfg)
    streams = [Stream.RAW, Stream.EVENTS, Stream.CHARTS]
    # Any bytes at all: every byte value, an empty payload, a large one.
    payloads = [bytes(range(256)), b"", b"\x00\xff" * 40_000]
    records: list[Append] = [
        (s, p, data + f"{s}/{p}".encode()) for s in streams for p in range(PARTITIONS)
        for data in payloads
    ]
    await asyncio.wait_for(lg.append_all(records), WAIT_S)
    last = b"\xc1 one more"
    offset = await asyncio.wait_for(lg.append(Stream.CHARTS, 2, last), WAIT_S)
    got = await read_back(kafka_broker, cfg, streams, len(records) + 2)  # + warm-up, + last
    for (stream, partition), messages in got.items():
        for m in messages:
            assert m.topic == f"{kafka_prefix}{stream}" and m.partition == partition
            assert m.key == str(partition).encode()
        want = [d for s, p, d in records if (s, p) == (stream, partition)]
        if (stream, partition) == (Stream.RAW, 0):
            want = [b"warm-up", *want]
        if (stream, partition) == (Stream.CHARTS, 2):
            want.append(last)
            assert messages[-1].offset == offset
        assert [m.value for m in messages] == want
        assert [m.offset for m in messages] == list(range(len(want)))
    assert len(got) == len(streams) * PARTITIONS
