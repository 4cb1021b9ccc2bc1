"""The lake's ``_SUCCESS`` for an events hour with ``log.backend: kafka``, on a real
Kafka-protocol broker (Tansu, see bench.tansu).

The files sink reads the processor's and its own committed offsets, and the raw
records' stamps, through the SinkContext's ``open_consumer`` (KafkaConsumers
here): an hour is marked once the processor committed past every raw record of
it (at a record stamped hour end + grace, or at a partition's end) and the sink
committed what it wrote; a processor behind a record of the hour keeps it
unmarked. The same rules on the embedded log: tests/sinks/test_sink_files.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_sink_files import GRACE_MS, H1, HOUR, WINDOW_MS, batch, config, event, events_batch

from bench.tansu import Broker
from evd.config import Config
from evd.core.config import KafkaConfig, LogConfig
from evd.core.log import SubLog, TopicPartition, records
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.kafka.producer import KafkaLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import EventsBatch, RawBatch
from evd.sinks.base import SinkContext
from evd.sinks.lake.completeness import hour_path
from evd.sinks.lake.sink import FilesSink

pytestmark = pytest.mark.workers_independent

PARTITIONS = 2
#: Bound of every wait for the broker.
WAIT_S = 15.0


class KafkaLake:
    """A Kafka log of PARTITIONS partitions per stream, and a files sink (worker 0,
    events only) whose SinkContext opens KafkaConsumers of it."""

    def __init__(self, broker: Broker, prefix: str, data_dir: Path) -> None:
        self.cfg = Config(
            log=LogConfig(backend="kafka", partitions=PARTITIONS),
            kafka=KafkaConfig(
                bootstrap_servers=[broker.bootstrap], topic_prefix=prefix, idempotence=False
            ),
        )
        self.log = KafkaLog(self.cfg)
        ctx = SinkContext(
            data_dir, 0, 1, PARTITIONS, WINDOW_MS, kafka=self.cfg.kafka,
            open_consumer=lambda name: KafkaConsumer(self.cfg, name),
        )
        self.sink = FilesSink(config(streams=["events"]), ctx, check_interval_s=3600.0)
        #: The offset after the last record appended, per (stream, partition).
        self.ends: dict[tuple[str, int], int] = {}

    async def start(self) -> None:
        await asyncio.wait_for(self.log.start(), WAIT_S)
        await self.sink.start()

    async def _append(self, stream: str, partition: int, payload: bytes) -> int:
        offset = await asyncio.wait_for(self.log.append(stream, partition, payload), WAIT_S)
        self.ends[stream, partition] = offset + 1
        return offset

    async def raw(self, partition: int, received_at: int) -> int:
        """Append a raw record received (stamped) at ``received_at``; its offset."""
        value = RawBatch(received_at, [event(0, received_at)])
        return await self._append(Stream.RAW, partition, records.encode(Kind.RAW, received_at, value))

    async def events(self, partition: int, value: EventsBatch) -> int:
        return await self._append(
            Stream.EVENTS, partition, records.encode(Kind.EVENTS, value.received_at, value)
        )

    async def commit(self, name: str, stream: str, offsets: dict[int, int]) -> None:
        """Commit ``{partition: offset}`` of ``stream`` as consumer ``name``."""
        consumer = KafkaConsumer(self.cfg, name)
        try:
            consumer.assign(TopicPartition(stream, p) for p in range(PARTITIONS))
            await asyncio.wait_for(
                consumer.commit({SubLog(stream, p, 0): o for p, o in offsets.items()}), WAIT_S
            )
        finally:
            await asyncio.wait_for(consumer.close(), WAIT_S)

    async def marked(self, now_ms: int) -> list[Path]:
        return await asyncio.wait_for(self.sink.mark_complete_hours(now_ms), WAIT_S)

    def marker(self, hour: int) -> Path:
        return self.sink.root / "events" / hour_path(hour) / "_SUCCESS"

    async def close(self) -> None:
        await self.sink.close()
        await asyncio.wait_for(self.log.close(), WAIT_S)


@pytest.fixture
async def lake(
    kafka_broker: Broker, kafka_prefix: str, tmp_path: Path
) -> AsyncIterator[KafkaLake]:
    held = KafkaLake(kafka_broker, kafka_prefix, tmp_path)
    try:
        await held.start()
        yield held
    finally:
        await held.close()


async def test_events_hour_is_marked_once_the_processor_and_the_sink_committed_past_it(
    lake: KafkaLake,
) -> None:
    end = H1 + HOUR
    now = end + GRACE_MS + 1
    # Raw: partition 0 has two records of the hour, then one stamped end + grace;
    # partition 1 one of the hour.
    await lake.raw(0, H1 + 100)
    behind = await lake.raw(0, end - 5)
    after = await lake.raw(0, end + GRACE_MS)
    await lake.raw(1, H1 + 200)
    # The processor's outputs, which the sink writes.
    out = [events_batch(H1 + 100, 3), events_batch(end - 5, 2, start=3),
           events_batch(H1 + 200, 4, start=5)]
    for partition, value in zip([0, 0, 1], out, strict=True):
        await lake.events(partition, value)
    await lake.sink.write(batch("events", out, [0, 0, 1]))
    await lake.commit("lake", Stream.EVENTS, {p: lake.ends[Stream.EVENTS, p] for p in range(PARTITIONS)})

    # The sink delivered everything, but the processor has committed nothing:
    # the hour's records are not processed.
    assert await lake.marked(now) == []
    # The processor behind a record of the hour (at end - 5) on partition 0.
    await lake.commit("processor", Stream.RAW, {0: behind, 1: lake.ends[Stream.RAW, 1]})
    assert await lake.marked(now) == []
    assert not lake.marker(H1).exists()
    # The processor at the record stamped end + grace, and at the other partition's end.
    await lake.commit("processor", Stream.RAW, {0: after, 1: lake.ends[Stream.RAW, 1]})
    assert await lake.marked(now) == [lake.marker(H1)]


async def test_events_hour_waits_for_the_sinks_own_commit_past_an_empty_raw_partition(
    lake: KafkaLake,
) -> None:
    end = H1 + HOUR
    now = end + GRACE_MS + 1
    # Raw partition 1 stays empty: the processor never commits it, and it vouches
    # for the hour (nothing of it there).
    await lake.raw(0, H1 + 10)
    await lake.raw(0, H1 + 20)
    out = [events_batch(H1 + 10, 2), events_batch(H1 + 20, 3, start=2)]
    for value in out:
        await lake.events(0, value)
    await lake.sink.write(batch("events", out, [0, 0]))
    await lake.commit("processor", Stream.RAW, {0: lake.ends[Stream.RAW, 0]})
    # The sink has not committed what it wrote, then is one record short.
    assert await lake.marked(now) == []
    await lake.commit("lake", Stream.EVENTS, {0: lake.ends[Stream.EVENTS, 0] - 1})
    assert await lake.marked(now) == []
    await lake.commit("lake", Stream.EVENTS, {0: lake.ends[Stream.EVENTS, 0]})
    assert await lake.marked(now - 2) == []  # the grace has not passed
    assert await lake.marked(now) == [lake.marker(H1)]
