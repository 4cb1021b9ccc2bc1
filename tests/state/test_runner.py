"""The runner without a server: the state encoded a chunk at a time equals the
state encoded at once; restore with and without a snapshot, on real files."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from evdtest import track_id

from evd.config import load_config
from evd.core.log import PROCESSOR, SubLog, TopicPartition, records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.streams import Stream
from evd.core.schema import Event, Playback, RawBatch, Session, SessionsBatch
from evd.state import runner
from evd.state.charts import ChartsState
from evd.state.dedup import DedupState
from evd.state.processor import PartitionState
from evd.state.sessions import EmittedSession, OpenSession, SessionTableState
from evd.state.snapshots import DirectoryStore
from evd.state.watermark import WatermarkState

pytestmark = pytest.mark.workers_independent


def state(sessions: int, groups: int) -> PartitionState:
    return PartitionState(
        partition=1,
        dedup=DedupState(
            newest=5, groups=[(i, i, (f"id-{i}-a", f"id-{i}-b")) for i in range(groups)], seq=groups
        ),
        watermarks=WatermarkState(watermark=7, sources={0: 9}),
        buffer=[],
        sessions=SessionTableState(
            sessions=[
                OpenSession(f"u{i}", f"e{i}", i, i + 1, plays=[("spotify:track:x", i, 3, "skip")])
                for i in range(sessions)
            ],
            emitted=[
                EmittedSession(f"k{i}", f"f{i}", i, i + 2, 1, 0, b"\x98" + bytes(8))
                for i in range(sessions // 3)
            ],
        ),
        charts=ChartsState(),
    )


@pytest.mark.parametrize("n", [0, 1, 15, 16, 2000, 2001, 65535, 65536, 70001])
async def test_chunked_encoding_equals_encoding_at_once(n: int) -> None:
    expected = msgspec.msgpack.encode(state(n, n // 2))
    got = await runner.encode_state(state(n, n // 2))
    assert bytes(got) == expected
    decoded = msgspec.msgpack.decode(bytes(got), type=PartitionState)
    assert len(decoded.sessions.sessions) == n and len(decoded.dedup.groups) == n // 2
    assert len(decoded.sessions.emitted) == n // 3


async def test_the_loop_is_served_between_chunks() -> None:
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(other())
    await runner.encode_state(state(5 * runner.ENCODE_CHUNK, 0))
    task.cancel()
    assert turns >= 4


# -- restore, with real files ----------------------------------------------------------


async def raw_log(root: Path, n: int) -> tuple[EmbeddedLog, list[int]]:
    lg = EmbeddedLog(root, 2, writer=0)
    await lg.start()
    offsets = []
    for i in range(n):
        batch = RawBatch(1000 + i, [])
        offsets.append(await lg.append(Stream.RAW, 1, records.encode(records.Kind.RAW, 1000 + i, batch)))
    return lg, offsets


async def test_without_a_snapshot_everything_retained_is_read_again(tmp_path: Path) -> None:
    """Offsets committed for a snapshot that is gone are not where an empty state starts."""
    lg, offsets = await raw_log(tmp_path, 3)
    committer = EmbeddedConsumer(tmp_path, PROCESSOR)
    committer.assign([TopicPartition(Stream.RAW, 1)])
    await committer.commit({SubLog(Stream.RAW, 1, 0): offsets[2]})
    await committer.close()
    consumer = EmbeddedConsumer(tmp_path, PROCESSOR)
    run = runner.PartitionRunner(
        1, load_config(None, environ={}), lg, consumer, DirectoryStore(tmp_path / "state")
    )
    await run.restore()
    assert consumer.positions() == {SubLog(Stream.RAW, 1, 0): 0}
    await consumer.close()
    await lg.close()


async def test_a_snapshot_past_the_end_of_the_raw_log_reads_on_from_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lg, _ = await raw_log(tmp_path, 2)
    end = await lg.append(Stream.RAW, 1, records.encode(records.Kind.RAW, 9, RawBatch(9, [])))
    store = DirectoryStore(tmp_path / "state")
    cfg = load_config(None, environ={})
    consumer = EmbeddedConsumer(tmp_path, PROCESSOR)
    first = runner.PartitionRunner(1, cfg, lg, consumer, store)
    await first.restore()
    await first.step(0.1)
    await first.snapshot()
    await consumer.close()
    # The snapshot claims more of the sub-log than is there (records lost after
    # they were processed, as fsync: never and a power cut can do).
    snap = await store.load(1)
    assert snap is not None
    snap.offsets[0] = end + 10_000
    await store.save(snap)
    again = EmbeddedConsumer(tmp_path, PROCESSOR)
    second = runner.PartitionRunner(1, cfg, lg, again, store)
    await second.restore()
    durable_end = (await again.end_offsets())[SubLog(Stream.RAW, 1, 0)]
    assert again.positions()[SubLog(Stream.RAW, 1, 0)] == durable_end
    assert "reading on from its end" in caplog.text
    await again.close()
    await lg.close()


# -- revisions after a crash --------------------------------------------------------------


def _play(event_id: str, t: int, kind: str = "play", user: str = "u1") -> Event:
    return Event(
        event_id=event_id,
        timestamp=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=t),
        user_id=user,
        track_id=track_id(1),
        playback=Playback(position_ms=0, duration_ms=200_000),
        event_type=kind,  # type: ignore[arg-type]
    )


async def _sessions_in(root: Path, partition: int) -> list[Session]:
    reader = EmbeddedConsumer(root, None)
    reader.assign([TopicPartition(Stream.SESSIONS, partition)])
    found: list[Session] = []
    while records := await reader.fetch(1 << 20, 0.2):
        for record in records:
            found += records_decode_sessions(record.payload)
    await reader.close()
    return found


def records_decode_sessions(payload: bytes) -> list[Session]:
    value = records.decode(payload, Stream.SESSIONS)
    assert isinstance(value, SessionsBatch)
    return value.sessions


@pytest.mark.parametrize("crashed_run_emitted_more", [False, True])
async def test_a_replay_after_a_crash_never_emits_a_lower_revision(
    tmp_path: Path, crashed_run_emitted_more: bool
) -> None:
    """The replay re-emits what the crashed run emitted after the snapshot with the same
    revision (the same content: a duplicate); content the stream does not hold yet gets
    a revision above every one the stream holds for its id (there: a revision the
    crashed run reached with a late event the replay sees at another moment)."""
    cfg = load_config(None, environ={"EVD_PROCESSING__SESSION_GAP_MS": "1000"})
    lg = EmbeddedLog(tmp_path, 2, writer=0)
    await lg.start()
    store = DirectoryStore(tmp_path / "state")
    first = runner.PartitionRunner(
        1, cfg, lg, EmbeddedConsumer(tmp_path, PROCESSOR), store,
        outputs=EmbeddedConsumer(tmp_path, None),
    )
    await first.restore()
    await first.snapshot()
    t0 = 1_700_000_000_000

    async def append(*events: Event) -> None:
        raw = records.encode(records.Kind.RAW, t0, RawBatch(t0, list(events)))
        await lg.append(Stream.RAW, 1, raw)

    await append(_play("e1", t0), _play("e2", t0 + 100, "end"), _play("x", t0 + 20_000, user="u9"))
    while not await _sessions_in(tmp_path, 1):
        await first.step(0.2)
    [emitted] = await _sessions_in(tmp_path, 1)
    assert (emitted.user_id, emitted.revision, emitted.event_count) == ("u1", 0, 2)
    if crashed_run_emitted_more:
        # As if the crashed run had taken two late events into it: revision 1, 4 events.
        more = msgspec.structs.replace(emitted, revision=1, event_count=4)
        held = records.encode(records.Kind.SESSIONS, t0, SessionsBatch([more]))
        await lg.append(Stream.SESSIONS, 1, held)
    await first.close()  # a crash: no snapshot after the one before the events
    before = len(await _sessions_in(tmp_path, 1))
    second = runner.PartitionRunner(
        1, cfg, lg, EmbeddedConsumer(tmp_path, PROCESSOR), store,
        outputs=EmbeddedConsumer(tmp_path, None),
    )
    await second.restore()
    while len(await _sessions_in(tmp_path, 1)) < before + 1:  # the replay
        await second.step(0.2)
    await append(_play("e3", t0 + 50, "pause"))  # late, within the lateness
    while len(await _sessions_in(tmp_path, 1)) < before + 2:
        await second.step(0.2)
    replayed = (await _sessions_in(tmp_path, 1))[before:]
    assert [(s.user_id, s.event_count) for s in replayed] == [("u1", 2), ("u1", 3)]
    assert {s.session_id for s in replayed} == {emitted.session_id}
    assert [s.revision for s in replayed] == ([0, 2] if crashed_run_emitted_more else [0, 1])
    await second.close()
    await lg.close()
