"""Retention and the log's disk cap, on real files.

Segments go once every registered consumer (one that committed) is past them,
never the last one of a sub-log; a consumer without a commit for a sub-log
holds it whole; readers on a deleted segment move to the oldest retained
record or raise, as they asked. Streams without consumers go by age and by
bytes. Worker 0 sweeps the writers that no longer run. The disk cap sets and
clears ``disk_full`` from the log's usage and the filesystem's free space, and
end to end, through ``evd serve``, a small ``log.max_bytes`` turns POSTs into
503 + Retry-After within a couple of sweeps without losing an acknowledged event.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from evdtest import ServerFactory, batch, make_event, post, run_cli

from evd.core.config import LogConfig, RetentionConfig
from evd.core.errors import LogOverloaded
from evd.core.log import InvalidOffset, SubLog, TopicPartition, records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.embedded.retention import SWEEP_INTERVAL_S, Retention, log_disk_usage
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import DeadLetter

SEGMENT_BYTES = 4096
#: Records per test sub-log: about 330 bytes each, a dozen per segment, 5 segments.
RECORDS = 60
HOUR = 3600.0


def payload(i: int) -> bytes:
    value = DeadLetter(received_at=i, index=i, error="x" * 300, event=b"{}")
    return records.encode(Kind.DEAD_LETTER, 1_714_564_800_000 + i, value)


def index_of(data: bytes) -> int:
    value: DeadLetter = records.decode(data, Stream.DEAD_LETTER)
    return value.index


def seg_files(root: Path, stream: str, partition: int, writer: int = 0) -> list[Path]:
    return sorted((root / "log" / stream / f"{partition:04d}" / f"w{writer:03d}").glob("*.seg"))


def bases(root: Path, stream: str, partition: int, writer: int = 0) -> list[int]:
    return [int(p.name.removesuffix(".seg")) for p in seg_files(root, stream, partition, writer)]


def age(paths: list[Path], seconds: float) -> None:
    """Make these segment files look ``seconds`` old (their newest record too)."""
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def config(
    max_age_s: float = 0.0, retention_bytes: int = 0, max_bytes: int = 0, min_free_bytes: int = 0
) -> LogConfig:
    return LogConfig(
        segment_bytes=SEGMENT_BYTES, max_bytes=max_bytes, min_free_bytes=min_free_bytes,
        retention=RetentionConfig(max_age_s=max_age_s, max_bytes=retention_bytes),
    )


class Logs:
    """Writers' logs and consumers on one data dir; all closed after the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs: list[EmbeddedLog] = []
        self.consumers: list[EmbeddedConsumer] = []

    def open(self, writer: int = 0) -> EmbeddedLog:
        lg = EmbeddedLog(self.root, 2, writer=writer, segment_bytes=SEGMENT_BYTES)
        lg.open()
        self.logs.append(lg)
        return lg

    def consumer(self, name: str | None, **kw: object) -> EmbeddedConsumer:
        c = EmbeddedConsumer(self.root, name, **kw)  # type: ignore[arg-type]
        self.consumers.append(c)
        return c

    async def close(self) -> None:
        for c in self.consumers:
            await c.close()
        for lg in self.logs:
            await lg.close()


@pytest.fixture
async def logs(tmp_path: Path) -> AsyncIterator[Logs]:
    held = Logs(tmp_path)
    try:
        yield held
    finally:
        await held.close()


async def fill(lg: EmbeddedLog, stream: str = Stream.RAW, partition: int = 0, n: int = RECORDS) -> list[int]:
    """Append ``n`` records (indexes 0..n-1); their offsets, and the end after them."""
    offsets = list(await asyncio.gather(*(lg.append(stream, partition, payload(i)) for i in range(n))))
    return [*offsets, lg.end_offset(stream, partition)]


async def commit(logs: Logs, name: str, offsets: dict[SubLog, int]) -> None:
    c = logs.consumer(name)
    c.assign({TopicPartition(s.stream, s.partition) for s in offsets})
    await c.commit(offsets)


def kept_from(segment_bases: list[int], offset: int) -> list[int]:
    """The segments that hold ``offset`` and after it."""
    first = max(b for b in segment_bases if b <= offset)
    return [b for b in segment_bases if b >= first]


# -- registered consumers -------------------------------------------------------------------


async def test_segments_below_every_consumers_commit_go_never_the_last(logs: Logs) -> None:
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    before = bases(root, Stream.RAW, 0)
    assert len(before) >= 4
    sizes = {b: p.stat().st_size for b, p in zip(before, seg_files(root, Stream.RAW, 0), strict=True)}
    sub = SubLog(Stream.RAW, 0, 0)
    await commit(logs, "sink", {sub: offsets[30]})
    retention = Retention(lg, config(), root, None)

    freed = retention.sweep(time.time())
    assert bases(root, Stream.RAW, 0) == kept_from(before, offsets[30])
    assert freed == sum(sizes[b] for b in before if b not in bases(root, Stream.RAW, 0)) > 0
    assert retention.sweep(time.time()) == 0  # nothing more until the consumer moves

    # Everything from the committed offset on is still there.
    reader = logs.consumer(None)
    reader.assign([TopicPartition(Stream.RAW, 0)])
    reader.seek(sub, offsets[30])
    got = []
    while fetched := await reader.fetch(timeout=0.2):
        got += fetched
    assert [index_of(r.payload) for r in got] == list(range(30, RECORDS))

    await commit(logs, "sink", {sub: offsets[-1]})  # the end: all passed
    retention.sweep(time.time())
    assert bases(root, Stream.RAW, 0) == before[-1:]  # the last segment holds the end
    assert lg.end_offset(Stream.RAW, 0) == offsets[-1]
    await lg.append(Stream.RAW, 0, payload(RECORDS))  # and the writer goes on after it


async def test_the_slowest_consumer_holds_the_segments(logs: Logs) -> None:
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    before = bases(root, Stream.RAW, 0)
    sub = SubLog(Stream.RAW, 0, 0)
    await commit(logs, "fast", {sub: offsets[50]})
    await commit(logs, "slow", {sub: offsets[15]})
    retention = Retention(lg, config(), root, None)
    retention.sweep(time.time())
    assert bases(root, Stream.RAW, 0) == kept_from(before, offsets[15])
    await commit(logs, "slow", {sub: offsets[40]})
    retention.sweep(time.time())
    assert bases(root, Stream.RAW, 0) == kept_from(before, offsets[40])


async def test_a_registered_consumer_holds_everything_before_its_first_commit(
    logs: Logs,
) -> None:
    # The processor commits raw only with a snapshot; the audit stage commits at
    # once. Registered at start, the processor holds raw until its first snapshot.
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    before = bases(root, Stream.RAW, 0)
    slow = logs.consumer("processor")
    slow.assign([TopicPartition(Stream.RAW, 0)])
    await slow.register()
    await slow.register()  # again: harmless
    await commit(logs, "audit", {SubLog(Stream.RAW, 0, 0): offsets[-1]})
    Retention(lg, config(), root, None).sweep(time.time())
    assert bases(root, Stream.RAW, 0) == before
    await slow.commit({SubLog(Stream.RAW, 0, 0): offsets[40]})
    Retention(lg, config(), root, None).sweep(time.time())
    assert bases(root, Stream.RAW, 0) == kept_from(before, offsets[40])


async def test_a_keep_window_holds_recent_segments_consumers_passed(logs: Logs) -> None:
    # The charts view reads charts.retention_s of history at start-up: segments
    # written within that long stay though every sink passed them.
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    before = bases(root, Stream.RAW, 0)
    files = seg_files(root, Stream.RAW, 0)
    age(files[:2], 3600)  # the two oldest segments are an hour old, the rest new
    await commit(logs, "sink", {SubLog(Stream.RAW, 0, 0): offsets[-1]})
    retention = Retention(lg, config(), root, None, keep_s={Stream.RAW: 600.0})
    retention.sweep(time.time())
    assert bases(root, Stream.RAW, 0) == before[2:]
    Retention(lg, config(), root, None).sweep(time.time())  # negative control: no window
    assert bases(root, Stream.RAW, 0) == before[-1:]


async def test_a_consumer_without_a_commit_for_a_sublog_holds_it_whole(logs: Logs) -> None:
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg, Stream.RAW, 0)
    await fill(lg, Stream.RAW, 1)
    await fill(lg, Stream.DEAD_LETTER, 0)
    other = logs.open(1)
    await fill(other, Stream.RAW, 0)
    raw0, raw1, dead = bases(root, Stream.RAW, 0), bases(root, Stream.RAW, 1), bases(root, Stream.DEAD_LETTER, 0)
    other0 = bases(root, Stream.RAW, 0, 1)
    # The consumer of raw committed for writer 0's sub-log of partition 0 only.
    await commit(logs, "sink", {SubLog(Stream.RAW, 0, 0): offsets[30]})
    # Old and over every byte cap: retention by age and bytes would take all but the
    # last segment of each, but a stream with a consumer goes by its commits only.
    for stream, partition, writer in ((Stream.RAW, 0, 0), (Stream.RAW, 1, 0), (Stream.DEAD_LETTER, 0, 0), (Stream.RAW, 0, 1)):
        age(seg_files(root, stream, partition, writer), 2 * HOUR)
    cfg = config(max_age_s=HOUR, retention_bytes=1)
    Retention(lg, cfg, root, None).sweep(time.time())
    Retention(other, cfg, root, None).sweep(time.time())
    assert bases(root, Stream.RAW, 0) == kept_from(raw0, offsets[30])
    assert bases(root, Stream.RAW, 1) == raw1  # held at 0: no offsets file for the partition
    assert bases(root, Stream.RAW, 0, 1) == other0  # held at 0: the file lacks this writer
    assert bases(root, Stream.DEAD_LETTER, 0) == dead[-1:]  # no consumer: by age (control)


@pytest.mark.parametrize("after_sweep", [False, True], ids=["assigned-before", "seeks-after"])
async def test_a_reader_on_a_deleted_segment_moves_to_the_oldest_retained_record(
    logs: Logs, after_sweep: bool
) -> None:
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    sub = SubLog(Stream.RAW, 0, 0)
    await commit(logs, "sink", {sub: offsets[30]})
    reader = logs.consumer("reader", reset="earliest")  # never commits: not registered
    if not after_sweep:
        reader.assign([TopicPartition(Stream.RAW, 0)])  # positioned at 0, which the sweep deletes
    Retention(lg, config(), root, None).sweep(time.time())
    oldest = bases(root, Stream.RAW, 0)[0]
    assert 0 < oldest <= offsets[30]
    if after_sweep:
        reader.assign([TopicPartition(Stream.RAW, 0)])
        reader.seek(sub, 0)
    started = time.monotonic()
    got = await reader.fetch(timeout=5.0)
    waited = time.monotonic() - started
    assert got and got[0].offset == oldest
    first = offsets.index(oldest)
    while more := await reader.fetch(timeout=0.2):
        got += more
    assert [index_of(r.payload) for r in got] == list(range(first, RECORDS))
    # The data was there: a reset must not cost the fetch its whole timeout.
    assert waited < 2.0, f"the reset fetch took {waited:.2f} s"


@pytest.mark.parametrize("after_sweep", [False, True], ids=["assigned-before", "seeks-after"])
async def test_a_reader_that_asked_for_errors_raises_on_a_deleted_segment(
    logs: Logs, after_sweep: bool
) -> None:
    root = logs.root
    lg = logs.open(0)
    offsets = await fill(lg)
    sub = SubLog(Stream.RAW, 0, 0)
    await commit(logs, "sink", {sub: offsets[30]})
    reader = logs.consumer(None, reset="error")
    if not after_sweep:
        reader.assign([TopicPartition(Stream.RAW, 0)])
    Retention(lg, config(), root, None).sweep(time.time())
    if after_sweep:
        reader.assign([TopicPartition(Stream.RAW, 0)])
        reader.seek(sub, 0)
    with pytest.raises(InvalidOffset):
        await reader.fetch(timeout=1.0)
    reader.seek_to_beginning(sub)
    got = await reader.fetch(timeout=1.0)
    assert got[0].offset == bases(root, Stream.RAW, 0)[0]


# -- streams without consumers ------------------------------------------------------------


async def test_without_consumers_old_segments_go_by_age(logs: Logs) -> None:
    root = logs.root
    lg = logs.open(0)
    await fill(lg)
    before = seg_files(root, Stream.RAW, 0)
    retention = Retention(lg, config(max_age_s=HOUR), root, None)
    age(before, HOUR / 2)
    assert retention.sweep(time.time()) == 0  # not old enough (control)
    age(before[:2], 2 * HOUR)
    retention.sweep(time.time())
    assert seg_files(root, Stream.RAW, 0) == before[2:]
    age(before[2:], 2 * HOUR)
    retention.sweep(time.time())
    assert seg_files(root, Stream.RAW, 0) == before[-1:]  # never the last
    assert Retention(lg, config(max_age_s=0), root, None).sweep(time.time() + 1e9) == 0


@pytest.mark.parametrize("cap", [1, 3 * SEGMENT_BYTES + 100, 10**9])
async def test_without_consumers_the_oldest_segments_go_above_the_byte_cap(
    logs: Logs, cap: int
) -> None:
    root = logs.root
    lg = logs.open(0)
    await fill(lg)
    before = seg_files(root, Stream.RAW, 0)
    sizes = [p.stat().st_size for p in before]
    Retention(lg, config(retention_bytes=cap), root, None).sweep(time.time())
    kept = seg_files(root, Stream.RAW, 0)
    assert kept == before[len(before) - len(kept):]  # the oldest went
    kept_bytes = sum(sizes[len(before) - len(kept):])
    assert kept_bytes <= cap or len(kept) == 1
    if len(kept) < len(before):  # only as many as needed went
        assert kept_bytes + sizes[len(before) - len(kept) - 1] > cap


# -- retired writers -----------------------------------------------------------------------


async def test_worker_0_sweeps_the_writers_that_no_longer_run(logs: Logs) -> None:
    root = logs.root
    for writer in (1, 3):  # writer 1 still runs (another worker), writer 3 was retired
        other = logs.open(writer)
        await fill(other, Stream.DEAD_LETTER, 1)
        await fill(other, Stream.RAW, 1)
        await other.close()
    lg = logs.open(0)
    await fill(lg, Stream.DEAD_LETTER, 1)
    raw1, raw3 = bases(root, Stream.RAW, 1, 1), bases(root, Stream.RAW, 1, 3)
    # raw has a consumer: the retired writer's raw segments go by its commit, not by age.
    await commit(logs, "sink", {SubLog(Stream.RAW, 1, 3): raw3[2], SubLog(Stream.RAW, 1, 1): raw1[-1]})
    for writer in (0, 1, 3):
        age(seg_files(root, Stream.DEAD_LETTER, 1, writer), 2 * HOUR)
        age(seg_files(root, Stream.RAW, 1, writer), 2 * HOUR)
    dead = {w: bases(root, Stream.DEAD_LETTER, 1, w) for w in (0, 1, 3)}
    cfg = config(max_age_s=HOUR)

    Retention(lg, cfg, root, None).sweep(time.time())  # not worker 0: its own sub-logs only
    assert bases(root, Stream.DEAD_LETTER, 1, 0) == dead[0][-1:]
    assert bases(root, Stream.DEAD_LETTER, 1, 3) == dead[3]
    assert bases(root, Stream.RAW, 1, 3) == raw3

    sweeper = Retention(lg, cfg, root, retired_from=2)
    try:
        assert sweeper.sweep(time.time()) > 0
    finally:
        await sweeper.stop()
    assert bases(root, Stream.DEAD_LETTER, 1, 3) == dead[3][-1:]
    assert bases(root, Stream.RAW, 1, 3) == raw3[2:]
    # Writer 1 runs and sweeps its own sub-logs: worker 0 leaves them alone.
    assert bases(root, Stream.DEAD_LETTER, 1, 1) == dead[1]
    assert bases(root, Stream.RAW, 1, 1) == raw1


# -- the disk cap --------------------------------------------------------------------------


async def test_check_disk_sets_and_clears_disk_full(logs: Logs) -> None:
    lg = logs.open(0)
    retention = Retention(lg, config(max_bytes=1000, min_free_bytes=100), logs.root, None)
    cases: list[tuple[int, int, str | None]] = [
        (1000, 10**9, None),
        (1001, 10**9, "log.max_bytes=1000"),
        (10, 99, "log.min_free_bytes=100"),
        (10, 100, None),
        (5000, 5, "log.max_bytes=1000"),
    ]
    for usage, free, why in cases:
        retention.check_disk(usage, free)
        if why is None:
            assert lg.disk_full is None and not lg.overloaded
            await lg.append(Stream.RAW, 0, payload(usage))
        else:
            assert lg.disk_full is not None and why in lg.disk_full
            assert lg.overloaded
            with pytest.raises(LogOverloaded, match=why.replace(".", r"\.")):
                lg.append_all([(Stream.RAW, 0, payload(usage))])
    # log.max_bytes 0: no fixed cap, only the free space counts.
    uncapped = Retention(lg, config(max_bytes=0, min_free_bytes=100), logs.root, None)
    uncapped.check_disk(10**15, 10**9)
    assert lg.disk_full is None


async def test_log_disk_usage_counts_segments_and_journals(logs: Logs) -> None:
    root = logs.root
    assert log_disk_usage(root) == 0
    lg = logs.open(0)  # fsync "always": the journal holds what the flushes wrote
    await fill(lg, Stream.RAW, 0)
    await fill(lg, Stream.DEAD_LETTER, 1, n=5)
    await commit(logs, "sink", {SubLog(Stream.RAW, 0, 0): 0})  # offsets files are not counted
    segs = sum(p.stat().st_size for p in (root / "log").rglob("*.seg"))
    journals = sum(p.stat().st_size for p in (root / "log").rglob("*.journal"))
    assert segs > 0 and journals > 0
    assert log_disk_usage(root) == segs + journals


async def test_the_sweeping_task_sets_disk_full_within_a_sweep(logs: Logs) -> None:
    lg = logs.open(0)
    await fill(lg)
    retention = Retention(lg, config(max_bytes=10_000), logs.root, None)
    retention.start()
    try:
        deadline = time.monotonic() + 2 * SWEEP_INTERVAL_S + 2
        while lg.disk_full is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert lg.disk_full is not None
        with pytest.raises(LogOverloaded):
            lg.append_all([(Stream.RAW, 0, payload(0))])
        await lg.append(Stream.RAW, 0, payload(0), internal=True)
    finally:
        await retention.stop()


# -- end to end ------------------------------------------------------------------------------

#: The log's cap in the end-to-end test: a few seconds of POSTs fill it.
E2E_MAX_BYTES = 300_000


def test_a_full_log_turns_posts_into_503_and_loses_nothing_acknowledged(
    servers: ServerFactory,
) -> None:
    server = servers.start({
        "log": {
            "partitions": 2,
            "segment_bytes": 16_384,
            "max_bytes": E2E_MAX_BYTES,
            "min_free_bytes": 0,
        },
        # No processor snapshot (hence no raw commit, no raw segment deleted) within
        # the test: evd log-read must still show every acknowledged event.
        "snapshot": {"interval_s": 3600},
    })
    acked: set[str] = set()
    refused = None
    over_at: float | None = None
    deadline = time.monotonic() + 30
    n = 0
    while refused is None and time.monotonic() < deadline:
        if over_at is None and log_disk_usage(server.data_dir) > E2E_MAX_BYTES:
            over_at = time.monotonic()
        ids = [f"e{n}-{j}" for j in range(20)]
        n += 1
        resp = post(server.port, batch(make_event(e, user_id=f"u{j}") for j, e in enumerate(ids)))
        if resp.status == 200:
            acked.update(ids)
        elif resp.status == 503:
            refused = resp
        else:
            raise AssertionError(f"POST answered {resp.status}: {resp.body!r}")
    refused_at = time.monotonic()
    assert refused is not None, (
        f"no 503 in 30 s; the log uses {log_disk_usage(server.data_dir)} bytes\n"
        + server.log_text()[-3000:]
    )
    assert over_at is not None, "503 before the log reached its cap"
    assert int(refused.headers["retry-after"]) >= 1
    assert "disk cap" in refused.json()["error"]
    # Refused for the cap (the retention sweep says why), not for a full flush queue ...
    assert re.search(r"refusing appends: the log uses \d+ bytes, over log\.max_bytes=300000",
                     server.log_text())
    # ... and noticed within a couple of sweeps of the cap being passed.
    assert refused_at - over_at <= 2 * SWEEP_INTERVAL_S + 1.0
    # Nothing frees raw here, so the cap holds, on every worker once each has swept ...
    time.sleep(SWEEP_INTERVAL_S + 0.5)
    for i in range(4):
        again = post(server.port, batch([make_event(f"after-the-cap-{i}")]))
        assert again.status == 503, again
    # ... and every acknowledged event is in the log (read while the server runs:
    # its shutdown snapshot lets retention delete raw segments).
    out = run_cli("log-read", "--data-dir", str(server.data_dir), "--stream", Stream.RAW)
    assert out.returncode == 0, out.stderr
    logged = {json.loads(line)["event_id"] for line in out.stdout.splitlines()}
    assert len(acked) >= 100
    assert acked - logged == set(), "acknowledged events missing from evd log-read"
    assert not any(e.startswith("after-the-cap") for e in logged)
    assert server.stop() == 0

