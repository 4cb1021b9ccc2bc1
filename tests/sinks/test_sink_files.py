"""The files sink (the data lake) on real files: layout and hour split per
stream, rows read back (gzip, zstd, plain, Parquet with pyarrow and DuckDB when
installed), no partial file ever visible (during a write, after a failed
write, after a SIGKILL), _SUCCESS rules for charts, sessions and events with a
negative control for each condition (against a real embedded log and real
committed offsets), the late layout after a marker, zero-item batches, two
workers writing one hour.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from evdtest import sink_context

from evd.core.errors import ConfigError
from evd.core.log import Consumer, ConsumerRecord, Lag, SubLog, TopicPartition, records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    Context,
    DeadLetter,
    Device,
    Event,
    EventsBatch,
    Geo,
    Play,
    Playback,
    RawBatch,
    Session,
    SessionsBatch,
    epoch_ms,
)
from evd.sinks import rows
from evd.sinks.base import Batch, SinkContext, SinkError
from evd.sinks.lake import formats
from evd.sinks.lake import sink as lake_sink
from evd.sinks.lake.completeness import caught_up, hour_path, processed_until
from evd.sinks.lake.sink import FilesSink, FilesSinkConfig

pytestmark = pytest.mark.workers_independent

HOUR = rows.HOUR_MS
#: 2024-05-01T12:00:00Z, an hour start; H2 the hour after it.
H1 = 1_714_564_800_000
H2 = H1 + HOUR
WINDOW_MS = 60_000
GRACE_S = 60.0
GRACE_MS = int(GRACE_S * 1000)
PARTITIONS = 2
TRACK = "spotify:track:4uLU6hMCjMI75M1A2tKUQC"
#: Small segments: the log tests read across segment boundaries.
SEGMENT_BYTES = 4096


# -- building batches -------------------------------------------------------------------


def event(i: int, t_ms: int, **fields: Any) -> Event:
    """A realistic event; every fourth has no context, every fifth no geo."""
    values: dict[str, Any] = {
        "event_id": f"ev-{i:06d}-{t_ms}",
        "timestamp": dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC),
        "user_id": f"user-{i % 7}",
        "track_id": TRACK[:-4] + f"{i % 10000:04d}",
        "playback": Playback(position_ms=i * 10, duration_ms=212_000,
                             initiator="user_click" if i % 3 else None),
        "event_type": ("play", "pause", "resume", "seek", "skip", "end")[i % 6],
        "context": None if i % 4 == 3 else Context("spotify:app:home", "spotify:playlist:37i9"),
        "device": Device(os="iOS 16.5", client_version="8.8.32"),
        "geo": None if i % 5 == 4 else Geo("SE", "AB" if i % 2 else None),
    }
    values.update(fields)
    return Event(**values)


def decoded(stream: str, value: Any) -> Any:
    """``value`` as the delivery loop hands it: encoded as a log record, decoded."""
    kind = records.KIND_OF_STREAM[stream]
    return records.decode(records.encode(kind, 0, value), stream)


def events_batch(
    received_at: int, n: int, start: int = 0, late: Iterable[int] = (), skew_ms: int = 0
) -> EventsBatch:
    evs = [event(start + i, received_at - 1_500 + i) for i in range(n)]
    return decoded("events", EventsBatch(received_at, evs, skew_ms, list(late)))


def batch(stream: str, values: list[Any], partitions: list[int] | None = None) -> Batch:
    count = sum(rows.count_items(stream, v) for v in values)
    return Batch(stream, values, count, 100 * count, partitions)


def session(i: int, started_at: int) -> Session:
    plays = [Play(TRACK, started_at + k * 1000, 30_000 + k, "skip") for k in range(i % 3)]
    return Session(
        session_id=f"s-{i}", user_id=f"user-{i}", started_at=started_at,
        ended_at=started_at + 90_000, event_count=3 + i, play_count=len(plays),
        stream_count=len(plays), listened_ms=1000 * i, country=None if i % 2 else "SE",
        os="iOS" if i % 3 else None, plays=plays,
    )


def revised(s: Session, revision: int, retracted: bool = False) -> Session:
    return msgspec.structs.replace(s, revision=revision, retracted=retracted)


def chart_rows(window_start: int, n: int) -> list[ChartRow]:
    return [
        ChartRow(window_start, None if i % 3 == 0 else "SE", TRACK[:-2] + f"{i:02d}", i + 1)
        for i in range(n)
    ]


def dead_letter(received_at: int, i: int) -> DeadLetter:
    body = b'{"event_id": "x"}' if i % 2 else b"not json \xff"
    return DeadLetter(received_at, i, f"error {i}", body)


# -- the sink and the lake ------------------------------------------------------------------


def context(data_dir: Path, worker: int = 0, workers: int = 1) -> SinkContext:
    return sink_context(data_dir, worker, workers, PARTITIONS, WINDOW_MS)


def config(**kw: Any) -> FilesSinkConfig:
    kw.setdefault("streams", ["events", "late", "sessions", "charts", "dead_letter"])
    kw.setdefault("success_grace_s", GRACE_S)
    return FilesSinkConfig(name="lake", **kw)


class Sinks:
    """Sinks started for one test; all closed after it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.open: list[FilesSink] = []

    async def start(self, worker: int = 0, workers: int = 1, **kw: Any) -> FilesSink:
        interval = kw.pop("check_interval_s", 3600.0)  # tests mark hours themselves
        sink = FilesSink(config(**kw), context(self.data_dir, worker, workers),
                         check_interval_s=interval)
        await sink.start()
        self.open.append(sink)
        return sink

    async def close(self) -> None:
        for sink in self.open:
            await sink.close()


@pytest.fixture
async def sinks(tmp_path: Path) -> AsyncIterator[Sinks]:
    held = Sinks(tmp_path)
    try:
        yield held
    finally:
        await held.close()


def lake(sink: FilesSink) -> Path:
    return sink.root


def data_files(base: Path) -> list[Path]:
    """Every file readers see under ``base``: no part of its path under it starts
    with "." or "_" (markers, temporary files, _late, _progress)."""
    return sorted(
        p for p in base.rglob("*")
        if p.is_file() and not any(x.startswith((".", "_")) for x in p.relative_to(base).parts)
    )


def hidden_files(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob(".*") if p.is_file())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a lake file, whatever its format."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        out: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return out
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def expected(b: Batch) -> list[dict[str, Any]]:
    """The rows evd.sinks.rows makes of ``b`` (what every sink writes)."""
    return [json.loads(line) for line in rows.json_lines(b, WINDOW_MS).splitlines()]


def like_parquet(row: Any, type_: Any) -> Any:
    """An NDJSON row as a Parquet reader returns it: absent fields as None."""
    import pyarrow as pa

    if row is None:
        return None
    if pa.types.is_struct(type_):
        return {f.name: like_parquet(row.get(f.name), f.type) for f in type_}
    if pa.types.is_list(type_):
        return [like_parquet(x, type_.value_type) for x in row]
    return row


# -- layout and hours -----------------------------------------------------------------------


async def test_events_go_to_the_hour_of_received_at_in_hive_directories(sinks: Sinks) -> None:
    sink = await sinks.start()
    assert lake(sink) == sinks.data_dir / "lake" and lake(sink).is_dir()
    # Event times in the hour before: the hour is received_at's, not the event's.
    b = batch("events", [
        events_batch(H1 + 10, 3), events_batch(H2 - 1, 2, start=3), events_batch(H2, 4, start=5),
    ])
    await sink.write(b)
    found = data_files(lake(sink))
    assert [p.parent.relative_to(lake(sink)).as_posix() for p in found] == [
        "events/dt=2024-05-01/hour=12", "events/dt=2024-05-01/hour=13",
    ]
    for p in found:
        assert p.name.startswith("part-w00-") and p.name.endswith(".ndjson.gz")
    first, second = (read_rows(p) for p in found)
    assert [r["event_id"] for r in first] == [f"ev-{i:06d}-{t}" for i, t in
                                              [(0, H1 - 1490), (1, H1 - 1489), (2, H1 - 1488),
                                               (3, H2 - 1501), (4, H2 - 1500)]]
    assert len(second) == 4 and {r["received_at"] for r in second} == {H2}
    assert hour_path(H1) == "dt=2024-05-01/hour=12"


async def test_sessions_go_by_started_at_and_charts_by_window_start(sinks: Sinks) -> None:
    sink = await sinks.start()
    s = [session(0, H1 + 5), session(1, H2 + 5), session(2, H1 + HOUR - 1)]
    await sink.write(batch("sessions", [SessionsBatch(s, complete_until=H1)], [0]))
    charts = [ChartsBatch(0, H2, chart_rows(H2 - WINDOW_MS, 2)),
              ChartsBatch(1, H2 + WINDOW_MS, chart_rows(H2, 3))]
    await sink.write(batch("charts", charts, [0, 1]))
    by_dir = {p.parent.relative_to(lake(sink)).as_posix(): read_rows(p)
              for p in data_files(lake(sink))}
    assert sorted(by_dir) == [
        "charts/dt=2024-05-01/hour=12", "charts/dt=2024-05-01/hour=13",
        "sessions/dt=2024-05-01/hour=12", "sessions/dt=2024-05-01/hour=13",
    ]
    assert [r["session_id"] for r in by_dir["sessions/dt=2024-05-01/hour=12"]] == ["s-0", "s-2"]
    assert [r["session_id"] for r in by_dir["sessions/dt=2024-05-01/hour=13"]] == ["s-1"]
    assert {(r["window_start"], r["partition"]) for r in by_dir["charts/dt=2024-05-01/hour=12"]} \
        == {(H2 - WINDOW_MS, 0)}
    assert [r["window_end"] - r["window_start"] for r in by_dir["charts/dt=2024-05-01/hour=13"]] \
        == [WINDOW_MS] * 3


def every_stream() -> list[Batch]:
    """One batch per stream, two hours each, with late flags, skew and nulls."""
    return [
        batch("events", [events_batch(H1 + 5, 9, late=[1, 4], skew_ms=-90_000),
                         events_batch(H2 + 7, 8, start=9)]),
        batch("late", [events_batch(H1 + 9, 5, start=20)]),
        batch("sessions", [SessionsBatch([session(i, H1 + i * HOUR // 2) for i in range(4)]
                                         + [revised(session(1, H2 + HOUR - 1), 2, retracted=True)], H1)],
              [1]),
        batch("charts", [ChartsBatch(1, H2, chart_rows(H1, 4)),
                         ChartsBatch(0, H2 + HOUR, chart_rows(H2, 2)
                                     + [ChartRow(H2, "SE", TRACK, 9, 3)])], [1, 0]),
        batch("dead_letter", [dead_letter(H1 + 3, i) for i in range(3)]),
    ]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_ndjson_rows_read_back_as_the_shared_row_shapes(
    sinks: Sinks, compression: str
) -> None:
    sink = await sinks.start(compression=compression)
    ext = {"gzip": ".ndjson.gz", "zstd": ".ndjson.zst", "none": ".ndjson"}[compression]
    for b in every_stream():
        await sink.write(b)
        found = data_files(lake(sink) / b.stream)
        assert found and all(p.name.endswith(ext) for p in found)
        assert [r for p in found for r in read_rows(p)] == expected(b)


async def test_event_rows_carry_event_type_received_at_event_time_and_late(sinks: Sinks) -> None:
    """Checked from the event itself, not only against evd.sinks.rows."""
    sink = await sinks.start()
    b = events_batch(H1 + 5, 7, late=[2], skew_ms=1234)
    await sink.write(batch("events", [b]))
    (path,) = data_files(lake(sink))
    got = read_rows(path)
    for i, (row, ev) in enumerate(zip(got, b.events, strict=True)):
        assert row["event_type"] == ev.event_type  # "play" too, which the event omits
        assert row["received_at"] == H1 + 5
        assert row["event_time"] == epoch_ms(ev.timestamp) + 1234
        assert row["late"] is (i == 2)
        assert row["timestamp"] == msgspec.json.encode(ev.timestamp).decode().strip('"')
        assert ("context" in row) is (ev.context is not None)
    await sink.write(batch("late", [events_batch(H1 + 5, 3, start=50)]))
    assert all(r["late"] for p in data_files(lake(sink) / "late") for r in read_rows(p))


async def test_a_newline_inside_a_string_stays_inside_its_row(sinks: Sinks) -> None:
    sink = await sinks.start(compression="none")
    ev = event(1, H1, context=Context(page_uri="a\nb}\n{", playlist_uri=None))
    await sink.write(batch("events", [decoded("events", EventsBatch(H1 + 1, [ev, event(2, H1)]))]))
    got = read_rows(data_files(lake(sink))[0])
    assert len(got) == 2 and got[0]["context"] == {"page_uri": "a\nb}\n{"}


@pytest.mark.parametrize("deflate", ["zlib", "isal"])
async def test_gzip_files_are_plain_gzip_with_either_deflate(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch, deflate: str
) -> None:
    module = zlib if deflate == "zlib" else pytest.importorskip("isal.isal_zlib")
    monkeypatch.setattr(formats, "_deflate", module)
    sink = await sinks.start()
    b = batch("events", [events_batch(H1 + 5, 5000)])  # more than one chunk
    await sink.write(b)
    (path,) = data_files(lake(sink))
    assert read_rows(path) == expected(b)


async def test_parquet_rows_read_back_with_pyarrow(sinks: Sinks) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    sink = await sinks.start(format="parquet")
    assert sink.describe() == {"path": str(lake(sink)), "format": "parquet", "compression": "zstd"}
    for b in every_stream():
        await sink.write(b)
        found = data_files(lake(sink) / b.stream)
        assert found and all(p.suffix == ".parquet" for p in found)
        schema = pq.read_schema(found[0])
        assert pq.ParquetFile(found[0]).metadata.row_group(0).column(0).compression == "ZSTD"
        want = expected(b)
        if b.stream == "dead_letter":  # a column holds the event's JSON text
            for row, d in zip(want, b.values, strict=True):
                row["event"] = d.event.decode(errors="replace")
        row_type = pa.struct(list(schema))
        assert [r for p in found for r in read_rows(p)] == [like_parquet(r, row_type) for r in want]
    events = pq.read_schema(data_files(lake(sink) / "events")[0])
    assert events.field("received_at").type == pa.int64()
    assert events.field("late").type == pa.bool_()
    assert pa.types.is_struct(events.field("playback").type)
    sessions = pq.read_schema(data_files(lake(sink) / "sessions")[0])
    assert pa.types.is_list(sessions.field("plays").type)


async def test_parquet_row_groups_split_a_large_hour(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(formats, "PARQUET_ROW_GROUP", 100)
    sink = await sinks.start(format="parquet")
    b = batch("events", [events_batch(H1 + i, 30, start=30 * i) for i in range(10)])
    await sink.write(b)
    (path,) = data_files(lake(sink))
    assert pq.ParquetFile(path).num_row_groups == 3
    assert [r["event_id"] for r in read_rows(path)] == [r["event_id"] for r in expected(b)]


async def test_duckdb_reads_the_lake_as_a_hive_partitioned_table(sinks: Sinks) -> None:
    duckdb = pytest.importorskip("duckdb")
    pytest.importorskip("pyarrow")
    sink = await sinks.start(format="parquet")
    await sink.write(every_stream()[0])
    glob = str(lake(sink) / "events" / "**" / "*.parquet")
    got = duckdb.sql(
        f"SELECT hour, count(*), sum(late::int) FROM read_parquet('{glob}', hive_partitioning = true)"
        " GROUP BY hour ORDER BY hour"
    ).fetchall()
    assert got == [(12, 9, 2), (13, 8, 0)]


async def test_parquet_without_pyarrow_fails_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    sink = FilesSink(config(format="parquet"), context(tmp_path))
    with pytest.raises(ConfigError, match=r"evd\[parquet\]"):
        await sink.start()
    await sink.close()


async def test_describe_and_a_configured_path(tmp_path: Path, sinks: Sinks) -> None:
    sink = await sinks.start(path=str(tmp_path / "elsewhere"), compression="zstd")
    assert sink.describe() == {
        "path": str(tmp_path / "elsewhere"), "format": "ndjson", "compression": "zstd",
    }
    assert (tmp_path / "elsewhere").is_dir() and not (tmp_path / "lake").exists()


# -- never a partial file -----------------------------------------------------------------


async def test_files_are_hidden_temporaries_until_every_file_of_the_batch_is_renamed(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await sinks.start()
    seen: list[tuple[str, list[Path]]] = []
    rename = os.rename

    def spy(src: Any, dst: Any) -> None:
        seen.append((Path(src).name, data_files(lake(sink))))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    await sink.write(batch("events", [events_batch(H1 + 1, 3), events_batch(H2 + 1, 3)]))
    assert len(seen) == 2
    first, second = seen
    assert first[0].startswith(".part-w00-") and first[0].endswith(".ndjson.gz.tmp")
    assert first[1] == []  # nothing visible before the first rename
    assert len(second[1]) == 1  # the second file was still hidden then
    assert len(data_files(lake(sink))) == 2 and hidden_files(lake(sink)) == []


async def test_a_failed_write_leaves_nothing_and_its_retry_writes_the_batch_once(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await sinks.start()
    b = batch("events", [events_batch(H1 + 1, 3), events_batch(H2 + 1, 3, start=3)])
    fmt = sink._format
    assert fmt is not None
    write = fmt.write
    calls = 0

    def failing(f: Any, group: Batch) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        write(f, group)

    monkeypatch.setattr(fmt, "write", failing)
    with pytest.raises(SinkError, match="No space left"):
        await sink.write(b)
    assert data_files(lake(sink)) == [] and hidden_files(lake(sink)) == []
    monkeypatch.setattr(os, "rename", _fail_second(os.rename))
    with pytest.raises(SinkError, match="rename failed"):
        await sink.write(b)  # the first file was renamed, then taken back
    assert data_files(lake(sink)) == [] and hidden_files(lake(sink)) == []
    monkeypatch.undo()
    await sink.write(b)
    assert [r for p in data_files(lake(sink)) for r in read_rows(p)] == expected(b)


def _fail_second(rename: Any) -> Any:
    calls = 0

    def fail(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(5, "rename failed")
        rename(src, dst)

    return fail


async def test_start_removes_this_workers_temporaries_only(tmp_path: Path, sinks: Sinks) -> None:
    hour = tmp_path / "lake" / "events" / hour_path(H1)
    late = tmp_path / "lake" / "_late" / "charts" / hour_path(H1)
    for d in (hour, late):
        d.mkdir(parents=True)
    mine = [hour / ".part-w01-1714564800000-000003.ndjson.gz.tmp",
            late / ".part-w01-1714564800000-000004.parquet.tmp"]
    other = hour / ".part-w00-1714564800000-000001.ndjson.gz.tmp"
    kept = hour / "part-w01-1714564700000-000001.ndjson.gz"
    for p in [*mine, other, kept]:
        p.write_bytes(b"partial")
    await sinks.start(worker=1, workers=2)
    assert [p.exists() for p in mine] == [False, False]
    assert other.exists() and kept.exists()


#: Writes batches of one hour in a loop and says "go" once the first is written;
#: run in a process that the test kills.
WRITER = r"""
import asyncio, sys
from pathlib import Path
from evd.sinks.lake.sink import FilesSinkConfig
from evd.sinks.base import Batch
from evd.sinks.lake.sink import FilesSink
sys.path[:0] = sys.argv[2:4]  # this test module and the test support
from test_sink_files import H1, batch, events_batch, sink_context

async def main():
    sink = FilesSink(FilesSinkConfig(name="lake"), sink_context(Path(sys.argv[1]), 0, 1, 2, 60_000))
    await sink.start()
    b = batch("events", [events_batch(H1 + i, 100, start=100 * i) for i in range(100)])
    await sink.write(b)
    print("go", flush=True)
    while True:
        await sink.write(b)

asyncio.run(main())
"""


def test_after_a_sigkill_mid_write_every_visible_file_is_whole(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(Path(__file__).parent),
         str(Path(__file__).parents[1] / "support")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "go\n"
        directory = tmp_path / "lake" / "events" / hour_path(H1)
        deadline = time.monotonic() + 20
        while not any(p.name.endswith(".tmp") for p in directory.iterdir()):
            assert time.monotonic() < deadline, "no write in progress seen"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert hidden_files(tmp_path / "lake")  # the interrupted write's temporary file
    for path in data_files(tmp_path / "lake"):
        assert len(read_rows(path)) == 10_000  # whole: gzip checks its length and crc

    async def restart() -> None:
        sink = FilesSink(config(), context(tmp_path))
        await sink.start()
        await sink.close()

    asyncio.run(restart())
    assert hidden_files(tmp_path / "lake") == []


# -- _SUCCESS: charts and sessions ---------------------------------------------------------


def marker(sink: FilesSink, stream: str, hour: int) -> Path:
    return lake(sink) / stream / hour_path(hour) / "_SUCCESS"


def final(partition: int, until: int, chart_items: list[ChartRow]) -> ChartsBatch:
    """A charts record whose windows ending by ``until`` are closed and final."""
    return ChartsBatch(partition, until, chart_items, final_until=until)


async def test_charts_hour_is_marked_when_every_partition_is_final_past_it(sinks: Sinks) -> None:
    w0 = await sinks.start(worker=0, workers=2)
    w1 = await sinks.start(worker=1, workers=2)  # progress is shared through the lake
    end = H1 + HOUR
    now = end + GRACE_MS
    await w0.write(batch("charts", [final(0, end, chart_rows(end - WINDOW_MS, 3))], [0]))
    await w1.write(batch("charts", [final(1, end - WINDOW_MS, chart_rows(H1, 2))], [1]))
    assert await w0.mark_complete_hours(now) == []  # partition 1 is not final past the hour
    await w1.write(batch("charts", [final(1, end, [])], [1]))  # no rows, only progress
    assert len(data_files(lake(w0))) == 2  # the progress-only batch wrote no file
    assert await w0.mark_complete_hours(now - 1) == []  # the grace has not passed
    assert await w0.mark_complete_hours(now) == [marker(w0, "charts", H1)]
    body = json.loads(marker(w0, "charts", H1).read_bytes())
    assert body["files"] == 2 and body["marked_at"] == now
    assert await w0.mark_complete_hours(now + 1) == []  # marked once


async def test_charts_without_progress_from_a_partition_stay_unmarked(sinks: Sinks) -> None:
    sink = await sinks.start()
    await sink.write(batch("charts", [final(0, H2 + HOUR, chart_rows(H1, 1))], [0]))
    assert await sink.mark_complete_hours(H2 + HOUR * 10) == []
    await sink.write(batch("charts", [final(1, H2, [])], [1]))
    assert await sink.mark_complete_hours(H2 + HOUR * 10) == [marker(sink, "charts", H1)]


async def test_charts_closed_but_not_final_stay_unmarked(sinks: Sinks) -> None:
    """Closed windows may still be revised by late plays: only final_until marks
    an hour; a record without it moves nothing."""
    sink = await sinks.start()
    later = H2 + HOUR * 10
    # Closed far past the hour on both partitions, final before its end.
    await sink.write(batch("charts", [
        ChartsBatch(0, H2 + HOUR, chart_rows(H1, 2), final_until=H2 - WINDOW_MS),
        ChartsBatch(1, H2 + HOUR, [], final_until=H2 - WINDOW_MS),
    ], [0, 1]))
    assert await sink.mark_complete_hours(later) == []
    # Revisions of the hour's rows, closed_until moving on, final_until not set.
    revised = [ChartRow(r.window_start, r.country, r.track_id, r.plays + 1, 1)
               for r in chart_rows(H1, 2)]
    await sink.write(batch("charts", [ChartsBatch(0, H2 + 2 * HOUR, revised),
                                      ChartsBatch(1, H2 + 2 * HOUR, [])], [0, 1]))
    assert await sink.mark_complete_hours(later) == []
    await sink.write(batch("charts", [final(0, H2, []), final(1, H2, [])], [0, 1]))
    assert await sink.mark_complete_hours(later) == [marker(sink, "charts", H1)]
    # Every revision is a row of the hour.
    got = [r for p in data_files(lake(sink) / "charts") for r in read_rows(p)]
    assert sorted((r["track_id"], r["revision"], r["plays"]) for r in got) == sorted(
        [(r.track_id, 0, r.plays) for r in chart_rows(H1, 2)]
        + [(r.track_id, 1, r.plays) for r in revised]
    )


async def test_progress_never_goes_back(sinks: Sinks) -> None:
    sink = await sinks.start()
    await sink.write(batch("sessions", [SessionsBatch([], H2), SessionsBatch([], H1)], [0, 0]))
    again = await sinks.start()  # a restart replaying older records
    await again.write(batch("sessions", [SessionsBatch([], H1)], [0]))
    path = lake(sink) / "_progress" / "lake" / "sessions" / "p0000.json"
    assert json.loads(path.read_bytes()) == {"until": H2}


async def test_a_progress_that_fails_to_save_fails_no_write_and_is_saved_later(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await sinks.start()

    def full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lake_sink, "write_atomic", full)
    await sink.write(batch("charts", [final(0, H2, chart_rows(H1, 2))], [0]))
    assert len(data_files(lake(sink))) == 1  # written, and write did not raise: no retry
    path = lake(sink) / "_progress" / "lake" / "charts" / "p0000.json"
    assert not path.exists()
    monkeypatch.undo()
    await sink.write(batch("charts", [final(1, H1, [])], [1]))  # another partition's
    assert json.loads(path.read_bytes()) == {"until": H2}


async def test_sessions_hour_is_marked_by_complete_until_of_every_partition(sinks: Sinks) -> None:
    sink = await sinks.start()
    end = H1 + HOUR
    await sink.write(batch("sessions", [SessionsBatch([session(0, H1 + 10)], end),
                                        SessionsBatch([session(1, H1 + 20)], end - 1)], [0, 1]))
    assert await sink.mark_complete_hours(end + GRACE_MS) == []  # partition 1 is short by 1 ms
    await sink.write(batch("sessions", [SessionsBatch([], end)], [1]))
    assert await sink.mark_complete_hours(end + GRACE_MS) == [marker(sink, "sessions", H1)]


async def test_an_hour_without_a_data_file_gets_no_marker(sinks: Sinks) -> None:
    sink = await sinks.start()
    await sink.write(batch("sessions", [SessionsBatch([], H2 + HOUR)], [0]))
    await sink.write(batch("sessions", [SessionsBatch([], H2 + HOUR)], [1]))
    assert await sink.mark_complete_hours(H2 + 2 * HOUR) == []
    assert not (lake(sink) / "sessions").exists()


# -- _SUCCESS: events (the processor's and the sink's committed offsets) -------------------


class Log:
    """Two writers' embedded logs on the sink's data_dir, and commits by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writers = [EmbeddedLog(root, PARTITIONS, writer=w, segment_bytes=SEGMENT_BYTES)
                        for w in range(2)]
        for lg in self.writers:
            lg.open()

    async def raw(self, writer: int, partition: int, received_at: int) -> int:
        """Append a raw record received at ``received_at``; its offset."""
        value = RawBatch(received_at, [event(0, received_at)])
        payload = records.encode(Kind.RAW, received_at, value)
        return await self.writers[writer].append(Stream.RAW, partition, payload)

    async def events(self, writer: int, partition: int, value: EventsBatch) -> int:
        payload = records.encode(Kind.EVENTS, value.received_at, value)
        return await self.writers[writer].append(Stream.EVENTS, partition, payload)

    def end(self, writer: int, stream: str, partition: int) -> int:
        return self.writers[writer].end_offset(stream, partition)

    async def commit(self, name: str, stream: str, offsets: dict[tuple[int, int], int]) -> None:
        """Commit ``{(partition, writer): offset}`` as consumer ``name``."""
        consumer = EmbeddedConsumer(self.root, name)
        consumer.assign(TopicPartition(stream, p) for p in range(PARTITIONS))
        await consumer.commit({SubLog(stream, p, w): o for (p, w), o in offsets.items()})
        await consumer.close()

    async def close(self) -> None:
        for lg in self.writers:
            await lg.close()


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[Log]:
    held = Log(tmp_path)
    try:
        yield held
    finally:
        await held.close()


async def test_events_hour_needs_the_processor_past_it_then_the_sink_caught_up(
    sinks: Sinks, log: Log
) -> None:
    end = H1 + HOUR
    now = end + GRACE_MS + 1
    # Raw: writer 0 / partition 0 has a record of the hour, then one past the grace;
    # writer 1 / partition 1 only one of the hour.
    await log.raw(0, 0, H1 + 100)
    behind = await log.raw(0, 0, end - 5)
    after = await log.raw(0, 0, end + GRACE_MS)
    await log.raw(1, 1, H1 + 200)
    # The processor's outputs, which the sink writes.
    out = [events_batch(H1 + 100, 3), events_batch(end - 5, 2, start=3),
           events_batch(H1 + 200, 4, start=5)]
    await log.events(0, 0, out[0])
    await log.events(0, 0, out[1])
    await log.events(1, 1, out[2])
    sink = await sinks.start()
    await sink.write(batch("events", out, [0, 0, 1]))

    # The processor has committed nothing: its records of the hour are not processed.
    assert await sink.mark_complete_hours(now) == []
    # Processor behind: writer 0 committed at the record of end - 5.
    await log.commit("processor", Stream.RAW, {(0, 0): behind, (1, 1): log.end(1, Stream.RAW, 1)})
    assert await sink.mark_complete_hours(now) == []
    # Processor past the hour (at a record stamped end + grace, and at the end of the other).
    await log.commit("processor", Stream.RAW, {(0, 0): after, (1, 1): log.end(1, Stream.RAW, 1)})
    # ... but the sink has not committed what it wrote.
    assert await sink.mark_complete_hours(now) == []
    await log.commit("lake", Stream.EVENTS, {(0, 0): log.end(0, Stream.EVENTS, 0), (1, 1): 0})
    assert await sink.mark_complete_hours(now) == []  # partition 1 not yet
    await log.commit("lake", Stream.EVENTS, {(1, 1): log.end(1, Stream.EVENTS, 1)})
    assert await sink.mark_complete_hours(now - 2) == []  # the grace has not passed
    assert await sink.mark_complete_hours(now) == [marker(sink, "events", H1)]


async def test_processed_until_reads_the_stamp_of_the_record_at_the_committed_offset(
    log: Log, tmp_path: Path
) -> None:
    first = await log.raw(0, 0, H1)
    second = await log.raw(0, 0, H1 + 10)
    big = [await log.raw(1, 0, H1 + 20 + i) for i in range(40)]  # several segments
    end0, end1 = log.end(0, Stream.RAW, 0), log.end(1, Stream.RAW, 0)
    consumer = EmbeddedConsumer(tmp_path, None)
    consumer.assign(TopicPartition(Stream.RAW, p) for p in range(PARTITIONS))
    try:
        def at(o0: int | None, o1: int | None) -> dict[SubLog, int]:
            out = {}
            if o0 is not None:
                out[SubLog(Stream.RAW, 0, 0)] = o0
            if o1 is not None:
                out[SubLog(Stream.RAW, 0, 1)] = o1
            return out

        assert await processed_until(consumer, at(end0, end1), H1 + 1000)
        assert await processed_until(consumer, at(second, end1), H1 + 10)
        assert not await processed_until(consumer, at(second, end1), H1 + 11)
        assert not await processed_until(consumer, at(first, end1), H1 + 10)
        assert await processed_until(consumer, at(end0, big[30]), H1 + 50)
        assert not await processed_until(consumer, at(end0, big[30]), H1 + 51)
        # No commit: the sub-log counts from its oldest record (stamped H1 + 20).
        assert await processed_until(consumer, at(end0, None), H1 + 20)
        assert not await processed_until(consumer, at(end0, None), H1 + 21)
    finally:
        await consumer.close()


class GrowingRaw(Consumer):
    """The Consumer role over one raw partition of two sub-logs: ``cold`` holds
    one record stamped ``stamp``; ``hot`` gets a record stamped H1 at each call
    (a writer appending all the time). ``hot_first``: fetch
    serves ``hot`` whenever it has a record (the worst order for the check);
    else the sub-logs with records take turns."""

    def __init__(self, stamp: int, hot_first: bool) -> None:
        self.cold, self.hot = SubLog(Stream.RAW, 0, 0), SubLog(Stream.RAW, 0, 1)
        self.stamp = stamp
        self.hot_first = hot_first
        self.hot_end = 10
        self.pos: dict[SubLog, int] = {}
        self.turn = 0
        self.fetches = 0

    def _ends(self) -> dict[SubLog, int]:
        return {self.cold: 1, self.hot: self.hot_end}

    async def end_offsets(self) -> dict[SubLog, int]:
        self.hot_end += 1
        return self._ends()

    def seek(self, sublog: SubLog, offset: int) -> None:
        self.pos[sublog] = offset

    def seek_to_beginning(self, sublog: SubLog) -> None:
        self.pos[sublog] = 0

    async def fetch(self, max_bytes: int = 1 << 20, timeout: float = 1.0) -> list[ConsumerRecord]:
        self.fetches += 1
        self.hot_end += 1
        ready = [s for s, end in self._ends().items() if self.pos.get(s, 0) < end]
        if not ready:
            return []
        if self.hot_first:
            ready.sort(key=lambda s: s != self.hot)
        else:
            self.turn += 1
            ready = ready[self.turn % len(ready):] + ready[: self.turn % len(ready)]
        sublog = ready[0]
        offset = self.pos.get(sublog, 0)
        stamp = self.stamp if sublog == self.cold else H1
        payload = records.encode(Kind.RAW, stamp, RawBatch(stamp, []))
        return [ConsumerRecord(sublog, offset, offset + 1, payload)]

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        raise NotImplementedError

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(Stream.RAW, 0)}

    def positions(self) -> dict[SubLog, int]:
        return dict(self.pos)

    def backlog(self) -> set[SubLog]:
        raise NotImplementedError

    async def commit(self, offsets: Mapping[SubLog, int] | None = None) -> None:
        raise NotImplementedError

    async def committed(self) -> dict[SubLog, int]:
        raise NotImplementedError

    def lag(self, now: float | None = None) -> Lag:
        raise NotImplementedError

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("hot_first", [False, True])
async def test_processed_until_ends_while_a_sublog_keeps_growing(hot_first: bool) -> None:
    fake = GrowingRaw(stamp=H1 + 5, hot_first=hot_first)
    committed = {fake.cold: 0, fake.hot: 11}  # hot at its end when the check starts
    got = await processed_until(fake, committed, H1 + 5)
    # Taking turns, the cold record is looked at; served last, it never is and the
    # check gives up (the next one decides) instead of fetching forever.
    assert got is not hot_first
    assert fake.fetches <= 2 * 2 + 16
    if not hot_first:
        assert not await processed_until(GrowingRaw(H1 + 4, False), committed, H1 + 5)


async def test_processed_until_is_false_without_any_raw_sublog(tmp_path: Path) -> None:
    consumer = EmbeddedConsumer(tmp_path, None)
    consumer.assign([TopicPartition(Stream.RAW, 0)])
    try:
        assert not await processed_until(consumer, {}, H1)
    finally:
        await consumer.close()


async def test_caught_up_compares_every_sublog_with_its_end(log: Log, tmp_path: Path) -> None:
    await log.events(0, 0, events_batch(H1, 1))
    await log.events(1, 1, events_batch(H1, 1))
    consumer = EmbeddedConsumer(tmp_path, None)
    consumer.assign(TopicPartition(Stream.EVENTS, p) for p in range(PARTITIONS))
    try:
        ends = {SubLog(Stream.EVENTS, 0, 0): log.end(0, Stream.EVENTS, 0), SubLog(Stream.EVENTS, 1, 1): log.end(1, Stream.EVENTS, 1)}
        assert await caught_up(consumer, ends)
        assert not await caught_up(consumer, {SubLog(Stream.EVENTS, 0, 0): ends[SubLog(Stream.EVENTS, 0, 0)]})
        short = dict(ends)
        short[SubLog(Stream.EVENTS, 1, 1)] -= 1
        assert not await caught_up(consumer, short)
    finally:
        await consumer.close()


# -- reading the latest revisions (the snippets of docs/architecture.md) ----------------------


ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def doc_block(language: str, containing: str) -> str:
    """The fenced ``language`` block of docs/architecture.md that holds ``containing``."""
    text = ARCHITECTURE.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split(f"```{language}\n")[1:]]
    (block,) = [b for b in blocks if containing in b]
    lines = block.splitlines()
    indent = min(len(x) - len(x.lstrip()) for x in lines if x.strip())
    return "\n".join(x[indent:] for x in lines) + "\n"


async def revised_lake(sinks: Sinks) -> Path:
    """A lake holding several revisions of sessions and chart rows, in several
    files, a retraction among them; returns its root."""
    sink = await sinks.start()
    s0, s1, s2, s3, s4 = (session(i, H1 + 1000 * i) for i in range(5))
    t0, t1 = TRACK, TRACK[:-2] + "zz"
    writes = [
        [s0, s1, s2, s3],
        [revised(s0, 1), revised(s3, 1)],
        [revised(s1, 1, retracted=True), revised(s3, 2)],
    ]
    for n, items in enumerate(writes):
        for s in items:
            s.event_count = 100 * n + s.event_count
        await sink.write(batch("sessions", [SessionsBatch(items)], [0]))
    await sink.write(batch("charts", [
        ChartsBatch(0, H1 + WINDOW_MS, [ChartRow(H1, "SE", t0, 2), ChartRow(H1, None, t0, 3)]),
        ChartsBatch(1, H1 + WINDOW_MS, [ChartRow(H1, None, t0, 1)]),
    ], [0, 1]))
    await sink.write(batch("charts", [
        ChartsBatch(0, H1 + 2 * WINDOW_MS, [ChartRow(H1, "SE", t0, 5, 1), ChartRow(H1, "SE", t1, 1)]),
    ], [0]))
    await sink.write(batch("charts", [ChartsBatch(0, H1 + 2 * WINDOW_MS,
                                                  [ChartRow(H1, "SE", t0, 6, 2)])], [0]))
    assert len(data_files(lake(sink) / "sessions")) == 3
    # Files of a lake from before revisions: rows without revision or retracted.
    for stream, row in (("sessions", expected(batch("sessions", [SessionsBatch([s4])]))[0]),
                        ("charts", rows.chart_dict(1, ChartRow(H1, "SE", t1, 4), WINDOW_MS))):
        del row["revision"]
        row.pop("retracted", None)
        old = lake(sink) / stream / hour_path(H1) / "part-w00-0-0.ndjson.gz"
        old.write_bytes(gzip.compress(json.dumps(row).encode() + b"\n"))
    return lake(sink)


#: The latest revision of each id revised_lake wrote: (session_id, event_count, revision).
LATEST_SESSIONS = [("s-0", 103, 1), ("s-2", 5, 0), ("s-3", 206, 2), ("s-4", 7, 0)]
#: (window_start, country, track, partition) -> (plays, revision).
LATEST_CHARTS = {
    (H1, "SE", TRACK, 0): (6, 2), (H1, None, TRACK, 0): (3, 0), (H1, None, TRACK, 1): (1, 0),
    (H1, "SE", TRACK[:-2] + "zz", 0): (1, 0), (H1, "SE", TRACK[:-2] + "zz", 1): (4, 0),
}


async def test_the_documented_python_reads_the_latest_revisions(sinks: Sinks) -> None:
    root = await revised_lake(sinks)
    code = doc_block("python", "def latest(").replace('"evd-data/lake"', repr(str(root)))
    namespace: dict[str, Any] = {}
    exec(compile(code, str(ARCHITECTURE), "exec"), namespace)  # noqa: S102 -- the docs' snippet
    got = sorted((s["session_id"], s["event_count"], s["revision"]) for s in namespace["sessions"])
    assert got == LATEST_SESSIONS  # s-1 retracted: neither it nor its revision 0
    assert {k: (r["plays"], r["revision"]) for k, r in namespace["charts"].items()} \
        == LATEST_CHARTS


async def test_the_documented_duckdb_query_reads_the_latest_revisions(sinks: Sinks) -> None:
    duckdb = pytest.importorskip("duckdb")
    root = await revised_lake(sinks)
    sql = doc_block("sql", "PARTITION BY session_id").replace("evd-data/lake", str(root))
    on_sessions, on_charts = (q for q in sql.split(";") if q.strip())
    conn = duckdb.connect()
    try:
        got = sorted(conn.sql(f"SELECT session_id, event_count, coalesce(revision, 0)"
                              f" FROM ({on_sessions})").fetchall())
        assert got == LATEST_SESSIONS
        charts = conn.sql(f"SELECT window_start, country, track_id, partition, plays,"
                          f" coalesce(revision, 0) FROM ({on_charts})").fetchall()
        assert {r[:4]: r[4:] for r in charts} == LATEST_CHARTS
    finally:
        conn.close()


# -- the late layout ---------------------------------------------------------------------------


async def test_rows_for_a_marked_hour_go_to_the_late_layout_and_are_counted(sinks: Sinks) -> None:
    sink = await sinks.start()
    end = H1 + HOUR
    await sink.write(batch("charts", [final(0, end, chart_rows(H1, 2)),
                                      final(1, end, chart_rows(H1, 1))], [0, 1]))
    assert await sink.mark_complete_hours(end + GRACE_MS) == [marker(sink, "charts", H1)]
    before = data_files(lake(sink) / "charts")
    # A replay after a processor crash: rows of the marked hour, and of the next.
    await sink.write(batch("charts", [ChartsBatch(0, end, chart_rows(H1, 2)),
                                      ChartsBatch(0, H2 + WINDOW_MS, chart_rows(H2, 4))], [0, 0]))
    assert sink.late_rows == 2
    late = data_files(lake(sink) / "_late")
    assert [p.parent.relative_to(lake(sink)).as_posix() for p in late] == [
        "_late/charts/dt=2024-05-01/hour=12",
    ]
    assert [r["window_start"] for r in read_rows(late[0])] == [H1, H1]
    now = data_files(lake(sink) / "charts")
    assert set(before) <= set(now)
    assert {p.parent.name for p in set(now) - set(before)} == {"hour=13"}
    # Another instance (another worker) finds the marker on disk.
    other = await sinks.start(worker=1, workers=2)
    await other.write(batch("charts", [ChartsBatch(1, end, chart_rows(H1, 3))], [1]))
    assert other.late_rows == 3


async def test_an_hour_marked_during_a_write_is_not_written_into(
    sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await sinks.start()
    fmt = sink._format
    assert fmt is not None
    write = fmt.write

    def marking(f: Any, group: Batch) -> None:
        write(f, group)
        (Path(f.name).parent / "_SUCCESS").write_bytes(b"{}")  # worker 0, meanwhile

    monkeypatch.setattr(fmt, "write", marking)
    await sink.write(batch("events", [events_batch(H1 + 1, 5)]))
    assert data_files(lake(sink) / "events") == []
    assert len(data_files(lake(sink) / "_late" / "events")) == 1 and sink.late_rows == 5


# -- zero items, two workers, the marking task --------------------------------------------------


async def test_zero_item_batches_write_no_file(sinks: Sinks) -> None:
    sink = await sinks.start()
    await sink.write(batch("events", [decoded("events", EventsBatch(H1, [], duplicates={"play": 2}))]))
    await sink.write(batch("sessions", [SessionsBatch([], H1)], [0]))
    await sink.write(batch("charts", [final(1, H1, [])], [1]))
    await sink.write(batch("dead_letter", []))
    assert data_files(lake(sink)) == []
    assert sorted(p.relative_to(lake(sink)).as_posix() for p in lake(sink).rglob("*.json")) == [
        "_progress/lake/charts/p0001.json", "_progress/lake/sessions/p0000.json",
    ]
    assert not (lake(sink) / "events").exists()


async def test_two_workers_write_distinct_files_into_one_hour(sinks: Sinks) -> None:
    w0 = await sinks.start(worker=0, workers=2)
    w1 = await sinks.start(worker=1, workers=2)
    b0 = batch("events", [events_batch(H1 + 1, 3)])
    b1 = batch("events", [events_batch(H1 + 2, 4, start=3)])
    await asyncio.gather(w0.write(b0), w1.write(b1))
    await w0.write(b0)
    found = data_files(lake(w0))
    assert len(found) == 3 and len({p.parent for p in found}) == 1
    assert sorted(p.name[:8] for p in found) == ["part-w00", "part-w00", "part-w01"]
    assert sum(len(read_rows(p)) for p in found) == 10


async def test_worker_0_marks_hours_in_the_background_until_closed(sinks: Sinks) -> None:
    w1 = await sinks.start(worker=1, workers=2, check_interval_s=0.01)
    assert not w1._tasks  # only worker 0 marks
    sink = await sinks.start(worker=0, workers=2, check_interval_s=0.01)
    assert len(sink._tasks) == 1
    await sink.write(batch("charts", [final(0, H2, chart_rows(H1, 1)),
                                      final(1, H2, [])], [0, 1]))
    deadline = time.monotonic() + 10
    while not marker(sink, "charts", H1).exists():
        assert time.monotonic() < deadline, "no marker"
        await asyncio.sleep(0.01)
    await sink.close()
    assert not sink._tasks
    with pytest.raises(RuntimeError, match="after close"):
        await sink.write(batch("charts", []))


async def test_write_before_start_is_an_error(tmp_path: Path) -> None:
    sink = FilesSink(config(), context(tmp_path))
    with pytest.raises(RuntimeError, match="before start"):
        await sink.write(batch("charts", []))
