"""The delivery loop every sink runs in (evd.sinks.delivery), on a real embedded
log, real consumers and a real ledger file, with a sink that records its writes
and fails on demand.

Covered: everything is written once and committed only after the write (ledger
and consumer offsets); batching by count and by age; retries with back-off and
Retry-After; dead-lettering after the limit and at once for a permanent error
(items in the dead_letter stream with the error and the stage); dead letters
never dead-lettered again; event_types filter (counted as filtered, late
indexes remapped); records a replaying processor emits again are skipped; a
restart resumes from the ledger; a stop during retries commits nothing; loops
sharing their decodes decode each record once; the consumer offsets follow the
ledger's within CONSUMER_COMMIT_S and at the stop; records arriving one by one
are fetched together while a batch gathers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evd.core.config import BatchConfig, RetryConfig
from evd.core.log import SubLog, TopicPartition, records
from evd.core.log.embedded.consumer import EmbeddedConsumer, committed_offsets
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import DeadLetter, Event, EventsBatch, Playback
from evd.sinks import delivery
from evd.sinks.audit.ledger import CountKey, Ledger, SeenKey, read_counts
from evd.sinks.base import Batch, PermanentSinkError, Sink, SinkError
from evd.sinks.decoded import DecodedRecords
from evd.sinks.delivery import DeliveryLoop

pytestmark = pytest.mark.workers_independent

PARTITIONS = 2
T0 = 1_764_583_200_000  # 2025-12-01T10:00Z, an hour start
HOUR = T0
TRACK = "spotify:track:" + "a" * 22


def event(eid: str, kind: str = "play") -> Event:
    return Event(
        event_id=eid, timestamp=datetime.fromtimestamp(T0 / 1000, UTC), user_id="u",
        track_id=TRACK, playback=Playback(0, 1000), event_type=kind,  # type: ignore[arg-type]
    )


def events_record(ids: list[str], raw_offset: int, kinds: list[str] | None = None,
                  late: list[int] | None = None, received_at: int = T0 + 5) -> bytes:
    kinds = kinds or ["play"] * len(ids)
    b = EventsBatch(
        received_at, [event(i, k) for i, k in zip(ids, kinds, strict=True)], 0,
        late or [], {}, 0, raw_offset,
    )
    return records.encode_events(Kind.EVENTS, received_at, b)


class RecordingSink(Sink):
    """Records every write; ``failures`` exceptions are raised first, one per write."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.failures: list[BaseException] = []
        self.attempts = 0
        self.closed = False

    async def write(self, batch: Batch) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(batch)

    async def close(self) -> None:
        self.closed = True

    def ids(self) -> list[str]:
        return [ev.event_id for b in self.batches for v in b.values for ev in v.events]


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[EmbeddedLog]:
    lg = EmbeddedLog(tmp_path, PARTITIONS, writer=0, fsync="never")
    await lg.start()
    yield lg
    await lg.close()


def make_loop(
    root: Path, lg: EmbeddedLog, sink: Sink, ledger: Ledger, *, name: str = "s",
    streams: list[str] | None = None, max_events: int = 10_000, max_age_s: float = 0.05,
    max_attempts: int = 3, event_types: list[str] | None = None,
) -> DeliveryLoop:
    return DeliveryLoop(
        name=name, sink=sink, consumer=EmbeddedConsumer(root, name), producer=lg,
        ledger=ledger, streams=streams or [Stream.EVENTS], partitions=list(range(PARTITIONS)),
        batch=BatchConfig(max_events=max_events, max_bytes=1 << 20, max_age_s=max_age_s),
        retry=RetryConfig(max_attempts=max_attempts, initial_backoff_s=0.01, max_backoff_s=0.02),
        event_types=event_types,
    )


async def run_until(loop: DeliveryLoop, done: Any, timeout: float = 10.0) -> None:
    """Run ``loop`` until ``done()`` holds, then stop it and wait for it."""
    task = asyncio.create_task(loop.run())
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert time.monotonic() < deadline, "delivery did not finish in time"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.01)
    finally:
        loop.stop()
        await asyncio.wait_for(task, timeout)
        await loop.consumer.close()


def counts(root: Path) -> dict[tuple[str, str, str], int]:
    return {(stage, metric, t): n for _, _, t, stage, metric, n in read_counts(root)}


async def test_everything_is_written_once_and_committed_after(
    tmp_path: Path, log: EmbeddedLog
) -> None:
    for i in range(20):
        await log.append(Stream.EVENTS, i % PARTITIONS, events_record([f"e{i}a", f"e{i}b"], i))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger)
    await run_until(loop, lambda: len(sink.ids()) == 40)
    assert sorted(sink.ids()) == sorted(f"e{i}{x}" for i in range(20) for x in "ab")
    assert sink.closed
    assert counts(tmp_path) == {("s", "delivered", "play"): 40}
    ends = {p: committed_offsets(tmp_path, "s", Stream.EVENTS, p) for p in range(PARTITIONS)}
    assert all(ends[p][0] > 0 for p in range(PARTITIONS))
    # A new loop of the same sink resumes where the ledger says: nothing again.
    again = RecordingSink()
    loop2 = make_loop(tmp_path, log, again, ledger)
    await log.append(Stream.EVENTS, 0, events_record(["new"], 100))
    await run_until(loop2, lambda: again.ids() == ["new"])
    await ledger.close()
    assert counts(tmp_path) == {("s", "delivered", "play"): 41}


async def test_batches_by_count_and_by_age(tmp_path: Path, log: EmbeddedLog) -> None:
    for i in range(10):
        await log.append(Stream.EVENTS, 0, events_record([f"a{i}", f"b{i}", f"c{i}"], i))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger, max_events=6, max_age_s=30.0)
    task = asyncio.create_task(loop.run())
    try:
        deadline = time.monotonic() + 5
        while len(sink.ids()) < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # 30 items in batches that each reached 6: no batch waited for its age.
        assert [b.count for b in sink.batches] == [6] * 5
        await log.append(Stream.EVENTS, 0, events_record(["late1"], 50))
        await asyncio.sleep(0.3)
        assert "late1" not in sink.ids()  # 1 item, far from 6 and from 30 s
    finally:
        loop.stop()
        await task
        await loop.consumer.close()
    assert sink.ids()[-1] == "late1"  # written at stop
    await ledger.close()


async def test_a_failed_write_is_retried_then_committed(tmp_path: Path, log: EmbeddedLog) -> None:
    await log.append(Stream.EVENTS, 0, events_record(["x"], 0))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    sink.failures = [SinkError("503"), OSError("reset"), SinkError("429", retry_after=0.2)]
    loop = make_loop(tmp_path, log, sink, ledger, max_attempts=4)
    started = time.monotonic()
    await run_until(loop, lambda: sink.ids() == ["x"])
    assert time.monotonic() - started >= 0.2  # Retry-After honoured
    assert sink.attempts == 4 and loop.retries == 3
    await ledger.close()
    assert counts(tmp_path) == {("s", "delivered", "play"): 1}


async def dead_letters(root: Path) -> list[DeadLetter]:
    c = EmbeddedConsumer(root, None)
    c.assign(TopicPartition(Stream.DEAD_LETTER, p) for p in range(PARTITIONS))
    out = [records.decode(r.payload, Stream.DEAD_LETTER) for r in await c.fetch(1 << 20, 0.5)]
    await c.close()
    return out


@pytest.mark.parametrize(
    ("failures", "attempts"),
    [([PermanentSinkError("400 bad")], 1), ([SinkError("503")] * 3, 3)],
    ids=["permanent", "retries-exhausted"],
)
async def test_a_batch_that_keeps_failing_goes_to_dead_letter(
    tmp_path: Path, log: EmbeddedLog, failures: list[SinkError], attempts: int
) -> None:
    await log.append(Stream.EVENTS, 1, events_record(["d1", "d2"], 0, ["play", "skip"]))
    await log.append(Stream.EVENTS, 1, events_record(["ok"], 1))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    sink.failures = list(failures)
    loop = make_loop(tmp_path, log, sink, ledger, max_events=2)  # [d1, d2] then [ok]
    await run_until(loop, lambda: "ok" in sink.ids())
    await ledger.close()
    assert sink.attempts == attempts + 1
    assert loop.dead_lettered == 2
    letters = await dead_letters(tmp_path)
    assert [msgspec.json.decode(d.event)["event_id"] for d in letters] == ["d1", "d2"]
    assert {d.stage for d in letters} == {"sink:s"} and {d.stream for d in letters} == {Stream.EVENTS}
    assert all(str(failures[-1]) in d.error for d in letters)
    assert counts(tmp_path) == {
        ("s", "dead_lettered", "play"): 1, ("s", "dead_lettered", "skip"): 1,
        ("s", "delivered", "play"): 1,
    }


async def test_dead_letters_are_not_dead_lettered_again(tmp_path: Path, log: EmbeddedLog) -> None:
    letter = DeadLetter(T0, 0, "bad", b'{"event_id": 1}')
    await log.append(Stream.DEAD_LETTER, 0, records.encode(Kind.DEAD_LETTER, T0, letter))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    sink.failures = [PermanentSinkError("no")]
    loop = make_loop(tmp_path, log, sink, ledger, streams=[Stream.DEAD_LETTER])
    await run_until(loop, lambda: loop.dead_lettered == 1)
    await ledger.close()
    assert len(await dead_letters(tmp_path)) == 1  # only the original


async def test_event_types_filter_and_late_indexes(tmp_path: Path, log: EmbeddedLog) -> None:
    kinds = ["play", "pause", "play", "skip"]
    await log.append(Stream.EVENTS, 0, events_record(["p1", "x1", "p2", "x2"], 0, kinds, late=[1, 2]))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger, event_types=["play"])
    await run_until(loop, lambda: len(sink.ids()) == 2)
    await ledger.close()
    value = sink.batches[0].values[0]
    assert [ev.event_id for ev in value.events] == ["p1", "p2"]
    assert value.late == [1]  # p2 was index 2, late; now index 1
    assert counts(tmp_path) == {
        ("s", "delivered", "play"): 2, ("s", "filtered", "pause"): 1,
        ("s", "filtered", "skip"): 1,
    }


async def test_records_a_replaying_processor_emits_again_are_skipped(
    tmp_path: Path, log: EmbeddedLog
) -> None:
    for off in (0, 1, 2):
        await log.append(Stream.EVENTS, 0, events_record([f"r{off}"], off))
    # The processor restarted from a snapshot at raw offset 1 and emits 1 and 2 again.
    for off in (1, 2, 3):
        await log.append(Stream.EVENTS, 0, events_record([f"r{off}"], off))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger)
    await run_until(loop, lambda: "r3" in sink.ids())
    assert sink.ids() == ["r0", "r1", "r2", "r3"]
    await ledger.close()
    # Across a restart of the sink too: the ledger keeps what it saw.
    await log.append(Stream.EVENTS, 0, events_record(["r2"], 2))
    await log.append(Stream.EVENTS, 0, events_record(["r4"], 4))
    ledger = Ledger(tmp_path)
    again = RecordingSink()
    loop = make_loop(tmp_path, log, again, ledger)
    await run_until(loop, lambda: again.ids() != [])
    await ledger.close()
    assert again.ids() == ["r4"]


async def test_a_stop_during_retries_commits_nothing(tmp_path: Path, log: EmbeddedLog) -> None:
    await log.append(Stream.EVENTS, 0, events_record(["s1"], 0))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    sink.failures = [SinkError("down", retry_after=60.0)]
    loop = make_loop(tmp_path, log, sink, ledger, max_attempts=10)
    await run_until(loop, lambda: sink.attempts == 1, timeout=5)
    await ledger.close()
    assert committed_offsets(tmp_path, "s", Stream.EVENTS, 0) == {}
    assert read_counts(tmp_path) == []
    assert CountKey(HOUR, Stream.EVENTS, "play", "delivered")  # the key shape the ledger uses


async def test_offsets_past_the_logs_end_read_on_from_the_end(
    tmp_path: Path, log: EmbeddedLog
) -> None:
    # A power cut (fsync never) took records this sink had delivered: the ledger's
    # offset is past the end, and appends go on from the end.
    await log.append(Stream.EVENTS, 0, events_record(["a"], 0))
    end = log.end_offset(Stream.EVENTS, 0)
    ledger = Ledger(tmp_path)
    await ledger.commit("s", {}, {SubLog(Stream.EVENTS, 0, 0): end + 5_000}, {})
    sink = RecordingSink()
    loop = make_loop(tmp_path, log, sink, ledger)
    await loop.start()  # restarts after the power cut, then the writer appends again
    await log.append(Stream.EVENTS, 0, events_record(["b"], 1))
    await run_until(loop, lambda: "b" in sink.ids())
    await ledger.close()
    assert sink.ids() == ["b"]


@pytest.mark.parametrize("raw_end", [None, 50])
async def test_raw_offsets_past_the_raw_logs_end_are_not_taken_for_replays(
    tmp_path: Path, log: EmbeddedLog, raw_end: int | None
) -> None:
    ledger = Ledger(tmp_path)
    await ledger.commit("s", {}, {}, {SeenKey(Stream.EVENTS, 0, 0): 100})
    # The raw log lost its records from offset 50 on: new raw records reuse 50..100.
    await log.append(Stream.EVENTS, 0, events_record(["new"], 60))
    await log.append(Stream.EVENTS, 0, events_record(["after"], 200))
    sink = RecordingSink()
    loop = make_loop(tmp_path, log, sink, ledger)

    async def raw_ends() -> dict[SubLog, int]:
        return {} if raw_end is None else {SubLog("raw", 0, 0): raw_end}

    loop.raw_ends = raw_ends
    await run_until(loop, lambda: "after" in sink.ids())
    await ledger.close()
    # Without the raw log's end (the negative control) "new" looks like a replay.
    assert sink.ids() == (["after"] if raw_end is None else ["new", "after"])


async def test_loops_sharing_decodes_decode_each_record_once_and_each_deliver_all(
    tmp_path: Path, log: EmbeddedLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(30):
        await log.append(Stream.EVENTS, i % PARTITIONS, events_record([f"e{i}"], i))
    decodes = 0
    real = records.decode_all

    def counting(payloads: list[bytes], stream: str) -> Any:
        nonlocal decodes
        decodes += len(payloads)
        return real(payloads, stream)

    monkeypatch.setattr(records, "decode_all", counting)
    ledger = Ledger(tmp_path)
    shared = DecodedRecords.of([[Stream.EVENTS], [Stream.EVENTS]])
    sinks = [RecordingSink(), RecordingSink()]
    loops = [make_loop(tmp_path, log, sink, ledger, name=f"s{i}") for i, sink in enumerate(sinks)]
    for loop in loops:
        loop.decoded = shared
    tasks = [asyncio.create_task(run_until(loop, lambda s=sink: len(s.ids()) == 30))
             for loop, sink in zip(loops, sinks, strict=True)]
    await asyncio.gather(*tasks)
    await ledger.close()
    expected = sorted(f"e{i}" for i in range(30))
    assert sorted(sinks[0].ids()) == expected and sorted(sinks[1].ids()) == expected
    # Every record decoded once for both loops (both read them at about the same time).
    assert decodes == 30 and (shared.hits, shared.misses) == (30, 30) and len(shared) == 0
    assert counts(tmp_path) == {("s0", "delivered", "play"): 30, ("s1", "delivered", "play"): 30}


@pytest.mark.parametrize("interval", [0.0, 3600.0])
async def test_consumer_offsets_follow_the_ledger_within_the_interval_and_at_stop(
    tmp_path: Path, log: EmbeddedLog, monkeypatch: pytest.MonkeyPatch, interval: float
) -> None:
    monkeypatch.setattr(delivery, "CONSUMER_COMMIT_S", interval)
    await log.append(Stream.EVENTS, 0, events_record(["a"], 0))
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger)
    task = asyncio.create_task(loop.run())
    try:
        deadline = time.monotonic() + 10
        while not (await ledger.offsets("s"))[0]:
            assert time.monotonic() < deadline, "nothing delivered in time"
            await asyncio.sleep(0.01)
        offsets, _ = await ledger.offsets("s")
        end = offsets[SubLog(Stream.EVENTS, 0, 0)]
        await asyncio.sleep(0.3)  # a few steps
        # Registered for retention from the start; the offsets then follow the
        # ledger's at the next step, or only at the stop when the interval is long.
        committed = committed_offsets(tmp_path, "s", Stream.EVENTS, 0)
        assert committed == ({0: end} if interval == 0 else {})
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
        await loop.consumer.close()
    assert committed_offsets(tmp_path, "s", Stream.EVENTS, 0) == {0: end}
    await ledger.close()


async def test_records_arriving_one_by_one_are_fetched_together(
    tmp_path: Path, log: EmbeddedLog
) -> None:
    sink, ledger = RecordingSink(), Ledger(tmp_path)
    loop = make_loop(tmp_path, log, sink, ledger, max_age_s=2.0)
    fetches = 0
    fetch = loop.consumer.fetch

    async def counted(max_bytes: int = 1 << 20, timeout: float = 1.0) -> Any:
        nonlocal fetches
        got = await fetch(max_bytes, timeout)
        fetches += bool(got)
        return got

    loop.consumer.fetch = counted  # type: ignore[method-assign]
    task = asyncio.create_task(loop.run())
    try:
        for i in range(40):  # one record every 10 ms: 0.4 s, within one batch's age
            await log.append(Stream.EVENTS, 0, events_record([f"o{i}"], i))
            await asyncio.sleep(0.01)
    finally:
        loop.stop()
        await asyncio.wait_for(task, 10)
        await loop.consumer.close()
    await ledger.close()
    assert sink.ids() == [f"o{i}" for i in range(40)]
    # A fetch per FETCH_INTERVAL_S at most while the batch gathered, not one per record.
    assert fetches <= 0.4 / delivery.FETCH_INTERVAL_S + 4, fetches
