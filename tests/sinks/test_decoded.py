"""Decoded records shared by a worker's delivery loops (evd.sinks.decoded): one decode
per record whoever reads it first; entries leave with their last reader or, at the
bound, oldest first (a later reader then decodes again); a reader behind the
others never fills the cache; the wiring shares the sinks' decodes and not the
audit's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from evd.config import Config
from evd.core.config import ServerConfig
from evd.core.log import ConsumerRecord, SubLog, records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import ChartsBatch
from evd.sinks.base import SinkContext
from evd.sinks.decoded import MISSING, DecodedRecords
from evd.stages import Stages

pytestmark = pytest.mark.workers_independent

SUB = SubLog(Stream.CHARTS, 0, 0)


def payload(i: int) -> bytes:
    return records.encode(Kind.CHARTS, 1000 + i, ChartsBatch(0, 1000 + i, []))


def read(cache: DecodedRecords, sublog: SubLog, offset: int, data: bytes) -> tuple[Any, bool]:
    """What a delivery loop does with a record: take it, else decode and put it;
    (the value, whether it was decoded here)."""
    value = cache.take(sublog, offset, len(data))
    if value is not MISSING:
        return value, False
    value = records.decode(data, sublog.stream)
    cache.put(sublog, offset, len(data), value)
    return value, True


def test_the_first_reader_decodes_and_the_last_one_removes_it() -> None:
    cache = DecodedRecords({Stream.CHARTS: 3})
    first, decoded = read(cache, SUB, 0, payload(0))
    assert decoded and len(cache) == 1
    assert read(cache, SUB, 0, payload(0)) == (first, False)
    assert len(cache) == 1  # one reader left
    value, decoded = read(cache, SUB, 0, payload(0))
    assert value is first and not decoded
    assert len(cache) == 0 and cache.nbytes == 0
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_stream_read_by_one_loop_is_not_kept() -> None:
    cache = DecodedRecords({Stream.CHARTS: 1, Stream.SESSIONS: 2})
    assert not cache.shares(Stream.CHARTS) and cache.shares(Stream.SESSIONS)
    read(cache, SUB, 0, payload(0))
    assert len(cache) == 0


def test_at_the_bound_the_oldest_go_and_are_decoded_again() -> None:
    size = len(payload(0))
    cache = DecodedRecords({Stream.CHARTS: 2}, max_bytes=3 * size)
    for i in range(5):  # the leader reads 5 records; 3 fit
        assert read(cache, SUB, i * size, payload(i))[1]
    assert len(cache) == 3 and cache.nbytes == 3 * size
    follower = [read(cache, SUB, i * size, payload(i)) for i in range(5)]
    assert [decoded for _, decoded in follower] == [True, True, False, False, False]
    assert [v.closed_until for v, _ in follower] == [1000 + i for i in range(5)]
    assert len(cache) == 0  # the evicted ones were not put back by the follower


def test_a_reader_behind_the_newest_entry_leaves_nothing() -> None:
    cache = DecodedRecords({Stream.CHARTS: 2})
    read(cache, SUB, 100, payload(1))
    read(cache, SUB, 0, payload(0))  # behind: the leader already passed 0
    assert len(cache) == 1
    other = SubLog(Stream.CHARTS, 1, 0)  # each sub-log has its own newest offset
    read(cache, other, 0, payload(0))
    assert len(cache) == 2


def test_another_record_at_the_same_offset_is_decoded_anew() -> None:
    cache = DecodedRecords({Stream.CHARTS: 2})
    read(cache, SUB, 0, payload(0))
    longer = records.encode(Kind.CHARTS, 7, ChartsBatch(0, 7, [], 7))
    value, decoded = read(cache, SUB, 0, longer)
    assert decoded and value.final_until == 7


def test_runs_of_a_fetch_are_decoded_in_one_call_each() -> None:
    size = len(payload(0))
    cache = DecodedRecords({Stream.CHARTS: 2}, max_bytes=4 * size)
    calls: list[int] = []

    def decode_all(stream: str, payloads: Sequence[bytes]) -> list[Any]:
        calls.append(len(payloads))
        return records.decode_all(payloads, stream)

    def run(first: int, last: int) -> list[ConsumerRecord]:
        return [ConsumerRecord(SUB, i * size, (i + 1) * size, payload(i)) for i in range(first, last)]

    leader = cache.values(run(0, 6), decode_all)  # 6 read, the newest 4 kept
    assert calls == [6] and len(cache) == 4
    follower = cache.values(run(0, 8), decode_all)  # 0-1 evicted, 6-7 new: decoded together
    assert calls == [6, 4]
    assert [v.closed_until for v in follower] == [1000 + i for i in range(8)]
    assert follower[2:6] == leader[2:6] and follower[2] is leader[2]
    assert len(cache) == 2  # 6 and 7, left by the follower for the leader
    assert [v is w for v, w in zip(cache.values(run(6, 8), decode_all), follower[6:], strict=True)] \
        == [True, True]
    assert calls == [6, 4] and len(cache) == 0


async def test_the_stages_share_the_sinks_decodes_and_not_the_audits(tmp_path: Path) -> None:
    cfg = Config(server=ServerConfig(data_dir=str(tmp_path)))  # lake and warehouse
    lg = EmbeddedLog(tmp_path, cfg.log.partitions, writer=0, fsync="never")
    await lg.start()
    stages = Stages(cfg, lg, lambda name: EmbeddedConsumer(tmp_path, name), (0,), print)
    ctx = SinkContext(
        data_dir=tmp_path, worker=0, workers=1, partitions=cfg.log.partitions,
        chart_window_ms=60_000, open_consumer=stages.open_consumer,
    )

    async def no_ends() -> dict[SubLog, int]:
        return {}

    try:
        loops = {loop.name: loop for loop in stages._delivery_loops(ctx, [0], no_ends)}
        shared = loops["lake"].decoded
        assert shared is not None and loops["warehouse"].decoded is shared
        assert loops["audit"].decoded is None
        # Every stream both sinks take; dead letters only the warehouse.
        assert shared.readers == {Stream.EVENTS: 2, Stream.SESSIONS: 2, Stream.CHARTS: 2}
        for loop in loops.values():
            await loop.consumer.close()
    finally:
        await stages.close()
        await lg.close()
