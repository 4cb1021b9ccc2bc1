"""The write-ahead journal behind fsync=always: a flush is one journal write and
fsync; partition files catch up from it after a crash; checkpoints drop it."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from test_embedded_log import open_log, read_all, segments

from evd.core.log.embedded.framing import frame
from evd.core.log.embedded.journal import DIRNAME, Journal, entry_head, read_entries
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.streams import Stream


def journal_files(root: Path, writer: int = 0) -> list[Path]:
    return sorted((root / "log" / DIRNAME / f"w{writer:03d}").glob("*.journal"))


async def crash_copy(tmp_path: Path, payloads: dict[int, list[bytes]], **kw: object) -> Path:
    """Append ``payloads`` durably, then copy the data dir as a crash would leave it
    (the log is still open: its journal has not been dropped)."""
    live = tmp_path / "live"
    lg = open_log(live, fsync="always", **kw)
    try:
        for partition, items in payloads.items():
            for payload in items:
                await lg.append(Stream.RAW, partition, payload)
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed)
    finally:
        await lg.close()
    return crashed


async def test_one_flush_is_one_journal_write_and_fsync(tmp_path: Path) -> None:
    lg = open_log(tmp_path, fsync="always", partitions=8)
    calls: list[int] = []
    lg.fsync_fn = calls.append  # type: ignore[assignment]
    try:
        futures = [lg.append(Stream.RAW, p, b"x" * 100) for p in range(8)]
        for fut in futures:
            await fut
        assert len(calls) == 1  # eight partitions, one group commit, one fsync
        assert [await read_all(lg, Stream.RAW, p) for p in range(8)] == [[b"x" * 100]] * 8
    finally:
        await lg.close()


async def test_partition_files_missing_a_durable_tail_are_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = {0: [b"a%d" % i for i in range(50)], 3: [b"b%d" % i for i in range(7)]}
    crashed = await crash_copy(tmp_path, payloads)
    assert journal_files(crashed), "the journal of an open log must exist"
    # The page cache held the partition writes and the machine lost power: the
    # partition files lost their tails, the fsynced journal did not.
    seg0 = segments(crashed, Stream.RAW, 0)[-1]
    os.truncate(seg0, seg0.stat().st_size // 3)  # mid-record: a torn tail as well
    for seg in segments(crashed, Stream.RAW, 3):
        os.truncate(seg, 0)
    with caplog.at_level(logging.WARNING):
        lg = open_log(crashed, fsync="always")
    try:
        assert await read_all(lg, Stream.RAW, 0) == payloads[0]
        assert await read_all(lg, Stream.RAW, 3) == payloads[3]
        assert "journal entries into the partition files" in caplog.text
        # New appends continue at the replayed end.
        await lg.append(Stream.RAW, 0, b"after")
        assert (await read_all(lg, Stream.RAW, 0))[-1] == b"after"
    finally:
        await lg.close()


async def test_replay_does_not_duplicate_records_already_in_the_partition(
    tmp_path: Path,
) -> None:
    payloads = {1: [b"r%d" % i for i in range(20)]}
    crashed = await crash_copy(tmp_path, payloads)
    for _ in range(2):  # and replaying twice changes nothing
        lg = open_log(crashed, fsync="always")
        try:
            assert await read_all(lg, Stream.RAW, 1) == payloads[1]
        finally:
            await lg.close()


async def test_a_torn_journal_tail_is_ignored(tmp_path: Path) -> None:
    payloads = {2: [b"t%d" % i for i in range(10)]}
    crashed = await crash_copy(tmp_path, payloads)
    journal = journal_files(crashed)[-1]
    with journal.open("ab") as f:  # half an entry: a flush torn by the crash
        f.write(entry_head(Stream.RAW, 2, 10**6, 500)[:7])
    entries = list(read_entries(journal))
    assert sum(len(e.frames) for e in entries) > 0
    lg = open_log(crashed, fsync="always")
    try:
        assert await read_all(lg, Stream.RAW, 2) == payloads[2]
    finally:
        await lg.close()


async def test_checkpoints_drop_the_journal_and_keep_the_data(tmp_path: Path) -> None:
    lg = open_log(tmp_path, fsync="always", checkpoint_bytes=4096)
    try:
        for i in range(200):
            await lg.append(Stream.RAW, i % 4, b"c" * 100)
        for _ in range(200):  # a checkpoint runs beside the flushes
            if len(journal_files(tmp_path)) <= 1:
                break
            await lg.flush()
        assert len(journal_files(tmp_path)) == 1
    finally:
        await lg.close()
    # close() checkpoints: nothing left to replay, everything in the partitions.
    assert all(p.stat().st_size == 0 for p in journal_files(tmp_path))
    lg = open_log(tmp_path, fsync="always")
    try:
        assert sum([len(await read_all(lg, Stream.RAW, p)) for p in range(4)]) == 200
    finally:
        await lg.close()


async def test_a_journal_left_by_fsync_always_is_replayed_under_another_policy(
    tmp_path: Path,
) -> None:
    payloads = {0: [b"p%d" % i for i in range(5)]}
    crashed = await crash_copy(tmp_path, payloads)
    for seg in segments(crashed, Stream.RAW, 0):
        os.truncate(seg, 0)
    lg = open_log(crashed, fsync="never")
    try:
        assert await read_all(lg, Stream.RAW, 0) == payloads[0]
    finally:
        await lg.close()
    assert not journal_files(crashed)


def test_journal_entries_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path, os.fsync)
    journal.start()
    data = frame(b"one") + frame(b"two")
    journal.append([entry_head("events", 5, 123, len(data)), data])
    journal.close()
    (entry,) = read_entries(journal.files[-1])
    assert (entry.stream, entry.partition, entry.offset, entry.frames) == ("events", 5, 123, data)


def test_the_journal_directory_is_not_a_stream(tmp_path: Path) -> None:
    lg = EmbeddedLog(tmp_path, 2)
    with pytest.raises(ValueError):
        lg._partition(DIRNAME, 0)


async def test_checkpoints_under_concurrent_flushes_lose_nothing(tmp_path: Path) -> None:
    # Journal rotation must not close the file a flush is writing (it did: EBADF).
    lg = open_log(tmp_path, fsync="always", checkpoint_bytes=2048)

    def slow_fsync(fd: int) -> None:
        time.sleep(0.002)  # widen the window in which a flush is in the journal's thread
        os.fsync(fd)

    lg.fsync_fn = slow_fsync  # type: ignore[method-assign]
    try:
        pending = []
        for i in range(3000):
            pending.append(lg.append(Stream.RAW, i % 4, b"%06d" % i))
            if i % 10 == 9:
                # Appends keep arriving while a flush is in the journal's thread.
                await asyncio.sleep(0.0005)
        await asyncio.gather(*pending)
        await lg.flush()
        assert lg.writable
        # Checkpoints kept happening: the journal stays near checkpoint_bytes, far
        # below the ~60 KB all 3000 records take.
        assert sum(p.stat().st_size for p in journal_files(tmp_path)) < 16 * 1024
    finally:
        await lg.close()
    lg = open_log(tmp_path, fsync="always")
    try:
        got = [int(p) for part in range(4) for p in await read_all(lg, Stream.RAW, part)]
        assert sorted(got) == list(range(3000))
    finally:
        await lg.close()


async def test_rolled_segments_are_synced_and_closed_by_the_next_checkpoint(
    tmp_path: Path,
) -> None:
    # Rolls no longer fsync on the event loop: the checkpoint fsyncs the rolled
    # files and closes them, so their fds do not pile up.
    lg = open_log(tmp_path, fsync="always", segment_bytes=4096, checkpoint_bytes=8192)
    synced: list[int] = []

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        os.fsync(fd)

    lg.fsync_fn = counting_fsync  # type: ignore[method-assign]
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        for i in range(400):
            await lg.append(Stream.RAW, i % 2, b"s" * 200)
        await lg.flush()
        for _ in range(200):
            if lg._checkpoint is None and not any(p.rolled for p in lg._parts.values()):
                break
            await asyncio.sleep(0.005)
        assert len(segments(tmp_path, Stream.RAW, 0)) > 5
        assert len(os.listdir("/proc/self/fd")) - fds_before < 10
    finally:
        await lg.close()
    lg = open_log(tmp_path, fsync="always")
    try:
        assert len(await read_all(lg, Stream.RAW, 0)) == 200
        assert len(await read_all(lg, Stream.RAW, 1)) == 200
    finally:
        await lg.close()


async def test_partitions_the_journal_covers_are_synced_before_it_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process crash (not a power cut) leaves the partition files complete but
    # maybe unsynced: dropping the journal without fsyncing them would turn the
    # next power cut into data loss.
    crashed = await crash_copy(tmp_path, {0: [b"a"], 2: [b"b"]})
    synced: set[str] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    lg = open_log(crashed, fsync="always")
    await lg.close()
    for partition in (0, 2):
        assert str(segments(crashed, Stream.RAW, partition)[-1]) in synced


async def test_a_segment_that_lost_its_tail_after_a_roll_is_refilled_from_the_journal(
    tmp_path: Path,
) -> None:
    # Rolls do not fsync: a power cut can keep a new segment (its creation went
    # out with the journal's fsync) while the rolled one loses its unsynced tail.
    # That gap must not hide acknowledged records the journal still holds.
    payloads = {0: [b"r%03d" % i + b"." * 300 for i in range(40)]}
    crashed = await crash_copy(tmp_path, payloads, segment_bytes=4096)
    segs = segments(crashed, Stream.RAW, 0)
    assert len(segs) >= 3
    os.truncate(segs[1], segs[1].stat().st_size // 3)  # mid-record
    os.truncate(segs[-1], 0)
    lg = open_log(crashed, fsync="always", segment_bytes=4096)
    try:
        assert await read_all(lg, Stream.RAW, 0) == payloads[0]
        await lg.append(Stream.RAW, 0, b"after")
        assert (await read_all(lg, Stream.RAW, 0))[-1] == b"after"
    finally:
        await lg.close()
