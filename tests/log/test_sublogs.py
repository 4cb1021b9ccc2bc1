"""One log writer per worker: each writer's own sub-logs and journal, recovery per
writer, the upgrade of a single-writer data dir, orphan writers, and readers in
other processes that read up to the published durable ends, wake without
polling, and never see bytes a writer killed mid-flush had not published."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_embedded_log import open_log, read_all, segments

from evd.core.errors import ConfigError
from evd.core.log.embedded.framing import frame
from evd.core.log.embedded.journal import entry_head
from evd.core.log.embedded.layout import read_partition, upgrade_layout
from evd.core.log.embedded.producer import EmbeddedLog, recover_writers
from evd.core.log.embedded.sublog import OffsetOutOfRange, SubLogReader, writers_of
from evd.core.log.embedded.wake import DurableWatch, Waker
from evd.core.log.streams import Stream
from evd.core.schema import DeadLetter, RawBatch, event_decoder, msgpack_encoder
from evd.logtool import iter_stream

SEED_EVENT = json.loads((Path(__file__).parents[1] / "data" / "seed-event.json").read_text())


def raw_record(*event_ids: str) -> bytes:
    """A raw-stream payload (as the edge writes it) holding events with these ids."""
    events = [event_decoder.decode(json.dumps(SEED_EVENT | {"event_id": e})) for e in event_ids]
    return msgpack_encoder.encode(RawBatch(received_at=1, events=events))


def logged(data_dir: Path, stream: str = Stream.RAW) -> list[tuple[int, int, str]]:
    """(partition, writer, event id) of every event ``evd log-read`` shows."""
    return sorted(
        (e["partition"], e["writer"], e["event_id"] if stream == Stream.RAW else e["event"]["event_id"])
        for e in iter_stream(data_dir, stream)
    )


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def reader_payloads(data_dir: Path, stream: str, partition: int, writer: int) -> list[bytes]:
    out: list[bytes] = []
    with SubLogReader(data_dir, stream, partition, writer) as reader:
        offset = 0
        while records := reader.read(offset):
            out += [r.payload for r in records]
            offset = records[-1].next_offset
    return out


# -- layout ---------------------------------------------------------------------------------


async def test_a_writer_writes_only_its_own_files(tmp_path: Path) -> None:
    lg = open_log(tmp_path, writer=3, fsync="always")
    try:
        await lg.append(Stream.RAW, 1, b"one")
        await lg.append(Stream.DEAD_LETTER, 0, b"two")
        files = files_under(tmp_path / "log")
    finally:
        await lg.close()
    journals = {f for f in files if f.startswith("_journal/")}
    assert journals and all(f.startswith("_journal/w003/") for f in journals)
    assert files - journals == {
        "_wake",
        "_sublogs",  # shared like _wake: appended to, never rewritten
        "raw/0001/w003/00000000000000000000.seg",
        "raw/0001/w003/durable",
        "dead_letter/0000/w003/00000000000000000000.seg",
        "dead_letter/0000/w003/durable",
    }
    assert writers_of(tmp_path, Stream.RAW, 1) == [3] and writers_of(tmp_path, Stream.RAW, 0) == []
    with pytest.raises(ValueError, match="writer 1000"):
        EmbeddedLog(tmp_path, 4, writer=1000)


async def test_two_writers_share_partitions_and_log_read_shows_both(tmp_path: Path) -> None:
    w0 = open_log(tmp_path, writer=0)
    w1 = open_log(tmp_path, writer=1)
    try:
        await asyncio.gather(
            *(w0.append(Stream.RAW, p, raw_record(f"w0-p{p}-{i}")) for p in range(4) for i in range(3)),
            *(w1.append(Stream.RAW, p, raw_record(f"w1-p{p}-{i}")) for p in range(2) for i in range(2)),
            w1.append_all([(Stream.DEAD_LETTER, 3, msgpack_encoder.encode(DeadLetter(
                received_at=1, index=0, error="bad", event=b'{"event_id":"dl-1"}',
            )))]),
        )
        # Each writer's own reads see its own sub-log, offsets from 0.
        assert len(await read_all(w0, Stream.RAW, 0)) == 3 and len(await read_all(w1, Stream.RAW, 0)) == 2
        assert (await w1.read(Stream.RAW, 0, 0))[0].offset == 0
        assert w1.end_offset(Stream.RAW, 3) == 0
    finally:
        await w0.close()
        await w1.close()
    assert writers_of(tmp_path, Stream.RAW, 0) == [0, 1] and writers_of(tmp_path, Stream.RAW, 3) == [0]
    expected = sorted(
        [(p, 0, f"w0-p{p}-{i}") for p in range(4) for i in range(3)]
        + [(p, 1, f"w1-p{p}-{i}") for p in range(2) for i in range(2)]
    )
    assert logged(tmp_path) == expected
    assert logged(tmp_path, Stream.DEAD_LETTER) == [(3, 1, "dl-1")]
    # The command itself: one JSON line per event, with its writer.
    out = (await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "evd", "log-read", "--data-dir", str(tmp_path)],
        capture_output=True, check=True, timeout=60,
    )).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted((e["partition"], e["writer"], e["event_id"]) for e in lines) == expected


async def crash_copy(tmp_path: Path, writers: dict[int, dict[int, list[bytes]]]) -> Path:
    """Each writer appends its records durably (fsync always); the data dir is copied
    while they are open, as a crash would leave it (journals not dropped)."""
    live = tmp_path / "live"
    logs = {w: open_log(live, writer=w, fsync="always") for w in writers}
    try:
        for w, parts in writers.items():
            for partition, payloads in parts.items():
                for payload in payloads:
                    await logs[w].append(Stream.RAW, partition, payload)
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed)
    finally:
        for lg in logs.values():
            await lg.close()
    return crashed


async def test_recovery_runs_per_writer(tmp_path: Path) -> None:
    data = {
        0: {0: [b"a%d" % i for i in range(20)]},
        1: {0: [b"b%d" % i for i in range(30)], 2: [b"c%d" % i for i in range(5)]},
    }
    crashed = await crash_copy(tmp_path, data)
    # A power cut took the unsynced tails of both writers' partition files.
    for w in (0, 1):
        for seg in segments(crashed, Stream.RAW, 0, writer=w):
            os.truncate(seg, seg.stat().st_size // 2)
    w0_files = {
        p: p.read_bytes() for p in (crashed / "log").rglob("*") if "w000" in p.parts and p.is_file()
    }
    w1 = open_log(crashed, writer=1, fsync="always")
    try:
        # Writer 1 replays its own journal and leaves writer 0's files alone.
        assert await read_all(w1, Stream.RAW, 0) == data[1][0]
        assert await read_all(w1, Stream.RAW, 2) == data[1][2]
        assert {p: p.read_bytes() for p in w0_files} == w0_files
    finally:
        await w1.close()
    w0 = open_log(crashed, writer=0, fsync="always")
    try:
        assert await read_all(w0, Stream.RAW, 0) == data[0][0]
    finally:
        await w0.close()


# -- the single-writer layout ---------------------------------------------------------------


def old_layout(root: Path) -> dict[tuple[str, int], list[bytes]]:
    """A data dir as evd wrote it before sub-logs, built by hand; the records it holds."""
    log_dir = root / "log"
    a, b, c, d = (raw_record(f"old-{x}") for x in "abcd")
    letter = msgpack_encoder.encode(
        DeadLetter(received_at=1, index=0, error="bad", event=b'{"event_id":"old-dl"}')
    )
    (log_dir / "raw" / "0000").mkdir(parents=True)
    (log_dir / "raw" / "0000" / f"{0:020d}.seg").write_bytes(frame(a) + frame(b))
    (log_dir / "raw" / "0002").mkdir(parents=True)
    (log_dir / "raw" / "0002" / f"{0:020d}.seg").write_bytes(frame(c))
    (log_dir / "raw" / "consumers").mkdir()
    (log_dir / "raw" / "consumers" / "sink.json").write_text('{"0": 5}')
    (log_dir / "dead_letter" / "0001").mkdir(parents=True)
    (log_dir / "dead_letter" / "0001" / f"{0:020d}.seg").write_bytes(frame(letter))
    # A crash left a journal: raw/0's entry is in its segment already, raw/2's
    # second record only in the journal.
    (log_dir / "_journal").mkdir()
    ab = frame(a) + frame(b)
    (log_dir / "_journal" / f"{7:020d}.journal").write_bytes(
        entry_head(Stream.RAW, 0, 0, len(ab)) + ab
        + entry_head(Stream.RAW, 2, len(frame(c)), len(frame(d))) + frame(d)
    )
    return {(Stream.RAW, 0): [a, b], (Stream.RAW, 2): [c, d], (Stream.DEAD_LETTER, 1): [letter]}


async def test_upgrade_layout_moves_an_old_data_dir_to_writer_0_losing_nothing(
    tmp_path: Path,
) -> None:
    records = old_layout(tmp_path)
    assert upgrade_layout(tmp_path) == 4
    assert files_under(tmp_path / "log") == {
        "raw/0000/w000/00000000000000000000.seg",
        "raw/0002/w000/00000000000000000000.seg",
        "raw/consumers/sink.json",
        "dead_letter/0001/w000/00000000000000000000.seg",
        "_journal/w000/00000000000000000007.journal",
    }
    assert upgrade_layout(tmp_path) == 0  # idempotent
    lg = open_log(tmp_path, writer=0)
    try:
        for (stream, partition), payloads in records.items():
            assert await read_all(lg, stream, partition) == payloads
    finally:
        await lg.close()
    assert [e for _, _, e in logged(tmp_path)] == ["old-a", "old-b", "old-c", "old-d"]
    assert {w for _, w, _ in logged(tmp_path)} == {0}
    with pytest.raises(ConfigError, match="log.partitions"):  # the count still cannot shrink
        EmbeddedLog(tmp_path, 2).open()


async def test_writer_0_upgrades_on_open_and_other_writers_refuse_the_old_layout(
    tmp_path: Path,
) -> None:
    records = old_layout(tmp_path)
    with pytest.raises(ConfigError, match="upgrade_layout"):
        EmbeddedLog(tmp_path, 4, writer=1).open()
    with pytest.raises(ConfigError, match="log.partitions"):
        EmbeddedLog(tmp_path, 2).open()
    lg = open_log(tmp_path, writer=0)
    try:
        assert await read_all(lg, Stream.RAW, 2) == records[(Stream.RAW, 2)]
    finally:
        await lg.close()
    other = open_log(tmp_path, writer=1)
    await other.close()


def test_upgrade_layout_refuses_to_overwrite_writer_0s_files(tmp_path: Path) -> None:
    old_layout(tmp_path)
    clash = tmp_path / "log" / "raw" / "0000" / "w000" / f"{0:020d}.seg"
    clash.parent.mkdir()
    clash.write_bytes(b"")
    with pytest.raises(ConfigError, match="both exist"):
        upgrade_layout(tmp_path)


# -- writers that no longer run ---------------------------------------------------------------


async def test_recover_writers_completes_an_orphan_with_unreplayed_journal_entries(
    tmp_path: Path,
) -> None:
    data = {
        0: {0: [b"kept-%d" % i for i in range(5)]},
        2: {0: [b"orphan-%d" % i for i in range(40)], 3: [b"o3-%d" % i for i in range(9)]},
    }
    crashed = await crash_copy(tmp_path, data)
    for partition in (0, 3):  # writer 2's partition files lost their unsynced tails
        for seg in segments(crashed, Stream.RAW, partition, writer=2):
            os.truncate(seg, seg.stat().st_size // 3)
    # Negative control: before recovery a reader stops where the file ends.
    assert len(reader_payloads(crashed, Stream.RAW, 0, 2)) < 40
    w0_journal = sorted((crashed / "log" / "_journal" / "w000").iterdir())
    assert w0_journal

    # As the supervisor calls it: in a thread without an event loop, any policy.
    assert await asyncio.to_thread(recover_writers, crashed, 4, 2, fsync="interval") == [2]
    assert reader_payloads(crashed, Stream.RAW, 0, 2) == data[2][0]
    assert reader_payloads(crashed, Stream.RAW, 3, 2) == data[2][3]
    assert not list((crashed / "log" / "_journal" / "w002").iterdir())
    # Writers that will run are left to recover themselves.
    assert sorted((crashed / "log" / "_journal" / "w000").iterdir()) == w0_journal
    assert recover_writers(crashed, 4, 2, fsync="always") == [2]  # harmless again
    assert recover_writers(crashed, 4, 3) == []
    assert writers_of(crashed, Stream.RAW, 0) == [0, 2] and writers_of(crashed, Stream.RAW, 3) == [2]
    with pytest.raises(ConfigError, match="log.partitions"):
        recover_writers(crashed, 2, 2)


# -- reading another writer's sub-log ---------------------------------------------------------


async def test_a_sublog_reader_stops_at_the_published_end_and_refuses_bad_offsets(
    tmp_path: Path,
) -> None:
    missing = SubLogReader(tmp_path, Stream.RAW, 0, 5)
    assert missing.durable_end() == 0 and missing.read(0) == []
    with pytest.raises(OffsetOutOfRange, match="past the durable end"):
        missing.read(8)
    missing.close()

    lg = open_log(tmp_path, writer=5, segment_bytes=256, fsync="never")
    reader = SubLogReader(tmp_path, Stream.RAW, 0, 5)
    try:
        await lg.append(Stream.RAW, 0, b"x" * 100)
        first = reader.read(0)
        assert [r.payload for r in first] == [b"x" * 100]
        # The writer rolls to segments the reader has not listed yet.
        payloads = [bytes([65 + i]) * 100 for i in range(10)]
        for p in payloads:
            await lg.append(Stream.RAW, 0, p)
        assert len(segments(tmp_path, Stream.RAW, 0, writer=5)) > 3
        assert reader.durable_end() == lg.end_offset(Stream.RAW, 0)
        rest = reader.read(first[-1].next_offset, max_bytes=150)
        assert rest[0].payload == payloads[0]
        offset, got = first[-1].next_offset, []
        while records := reader.read(offset):
            got += [r.payload for r in records]
            offset = records[-1].next_offset
        assert got == payloads and offset == reader.durable_end()

        with pytest.raises(OffsetOutOfRange, match="not the start of a record"):
            reader.read(first[0].offset + 3)
        with pytest.raises(OffsetOutOfRange, match="not the start of a record"):
            await lg.read(Stream.RAW, 0, first[0].offset + 3)
        with pytest.raises(OffsetOutOfRange, match="past the durable end"):
            reader.read(reader.durable_end() + 1)

        # Bytes in the file past the published end (a flush in progress) are not read;
        # they are there: a read of the files' whole frames returns them.
        seg = segments(tmp_path, Stream.RAW, 0, writer=5)[-1]
        with seg.open("ab") as f:
            f.write(frame(b"unpublished"))
        end = reader.durable_end()
        assert reader.read(end) == []
        whole = read_partition(tmp_path, Stream.RAW, 0, end, writer=5)
        assert [r.payload for r in whole] == [b"unpublished"]
    finally:
        reader.close()
        await lg.close()


READER = r"""
import asyncio, json, sys, time
from evd.core.log.embedded.sublog import SubLogReader
from evd.core.log.embedded.wake import DurableWatch

async def main(data_dir, want, timeout):
    watch = DurableWatch(data_dir)
    reader = SubLogReader(data_dir, "raw", 0, 1)
    got, offset, waits = [], 0, 0
    print("watching", flush=True)
    while len(got) < want:
        records = reader.read(offset)
        if records:
            got += [r.payload.decode() for r in records]
            offset = records[-1].next_offset
            continue
        waits += 1
        if not await watch.wait(timeout):
            break
    print(json.dumps({"got": got, "waits": waits, "cpu": time.process_time()}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


@pytest.mark.parametrize("poke", [True, False], ids=["woken", "negative-control-no-wakeups"])
async def test_a_reader_in_another_process_waits_without_polling_and_wakes_on_new_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poke: bool
) -> None:
    if not poke:
        monkeypatch.setattr(Waker, "poke", lambda self: None)
    bursts, per_burst = 4, 5
    # Each wait may last this long: a reader that only woke at its timeouts
    # would take far longer than the test allows it to.
    timeout = 30.0 if poke else 1.5
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READER, str(tmp_path), str(bursts * per_burst), str(timeout),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"watching\n"
        lg = open_log(tmp_path, writer=1)
        try:
            started = time.monotonic()
            for b in range(bursts):
                await asyncio.sleep(0.3)  # the reader has caught up and waits
                await asyncio.gather(
                    *(lg.append(Stream.RAW, 0, b"%d-%d" % (b, i)) for i in range(per_burst))
                )
            out = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            elapsed = time.monotonic() - started
        finally:
            await lg.close()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    print(f"reader: {out['waits']} waits, {elapsed:.2f} s, cpu {out['cpu']:.2f} s")
    if poke:
        assert out["got"] == [f"{b}-{i}" for b in range(bursts) for i in range(per_burst)]
        assert elapsed < timeout  # sooner than a single wait that ran to its timeout
        # One wait per wake-up: the bursts, the writer's recovery, a few spurious.
        assert out["waits"] <= bursts + 4
    else:
        # Without wake-ups the data is durable but the waiting reader never hears of it.
        assert out["got"] == [] and out["waits"] == 1


# -- a writer killed mid-flush ------------------------------------------------------------------

WRITER = r"""
import asyncio, os, signal, sys, time
from evd.core.log.embedded import producer as embedded

data_dir, fsync, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real_write = embedded._Partition.write
flushes = 0

def write(self, frames):
    # The segment write of a flush (recovery's replay writes one frame list too,
    # but it happens before any append).
    global flushes
    flushes += 1
    if mode == "kill-in-flush" and flushes == arg:
        data = b"".join(frames)
        os.write(self.fd, data[: len(data) * 5 // 8])  # whole frames and a torn one
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "slow":
        for f in frames:  # frame by frame, so a kill lands inside a flush's writes
            real_write(self, [f])
            time.sleep(0.0005)
        return
    real_write(self, frames)

embedded._Partition.write = write

async def main():
    lg = embedded.EmbeddedLog(data_dir, 2, writer=4, fsync=fsync)
    lg.open()
    print("open", flush=True)
    i = 0
    while True:
        await asyncio.gather(*(lg.append("raw", 1, b"%08d" % (i + j)) for j in range(8)))
        i += 8

asyncio.run(main())
"""


def start_writer(data_dir: Path, fsync: str, mode: str, arg: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), fsync, mode, str(arg)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"open\n"
    return proc


def check_sequence(payloads: list[bytes]) -> None:
    assert [int(p) for p in payloads] == list(range(len(payloads)))


async def recovered_payloads(data_dir: Path, fsync: str) -> tuple[list[bytes], int]:
    lg = EmbeddedLog(data_dir, 2, writer=4, fsync=fsync)  # type: ignore[arg-type]
    lg.open()
    try:
        return await read_all(lg, Stream.RAW, 1), lg.end_offset(Stream.RAW, 1)
    finally:
        await lg.close()


@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_a_writer_killed_mid_flush_exposes_nothing_unpublished_and_loses_nothing_published(
    tmp_path: Path, fsync: str
) -> None:
    proc = start_writer(tmp_path, fsync, "kill-in-flush", 30)
    try:
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    with SubLogReader(tmp_path, Stream.RAW, 1, 4) as reader:
        published = reader.durable_end()
        seen: list[bytes] = []
        offset = 0
        while records := reader.read(offset, max_bytes=100):
            assert records[-1].next_offset <= published
            seen += [r.payload for r in records]
            offset = records[-1].next_offset
    assert offset == published and len(seen) == 29 * 8
    check_sequence(seen)
    # The killed flush left whole frames (and a torn one) past the published end:
    # there was something to expose.
    on_disk = read_partition(tmp_path, Stream.RAW, 1, published, writer=4)
    assert len(on_disk) >= 2

    payloads, end = await recovered_payloads(tmp_path, fsync)
    assert payloads[: len(seen)] == seen and end >= published
    check_sequence(payloads)
    if fsync == "always":  # the killed flush was in the fsynced journal
        assert len(payloads) == 30 * 8


async def test_a_reader_racing_a_writer_killed_at_a_random_moment(
    tmp_path: Path, rng: random.Random
) -> None:
    proc = start_writer(tmp_path, "always", "slow", 0)
    seen: list[tuple[int, int, bytes]] = []
    try:
        kill_at = time.monotonic() + rng.uniform(0.3, 1.5)
        with DurableWatch(tmp_path) as watch, SubLogReader(tmp_path, Stream.RAW, 1, 4) as reader:
            offset = 0
            killed = False
            while True:
                records = reader.read(offset, max_bytes=rng.choice([50, 300, 1 << 20]))
                end = reader.durable_end()
                for r in records:
                    assert r.next_offset <= end, "read past the published durable end"
                    seen.append((r.offset, r.next_offset, r.payload))
                if records:
                    offset = records[-1].next_offset
                    continue
                if killed:
                    break
                if time.monotonic() >= kill_at:
                    proc.kill()
                    assert proc.wait(30) == -signal.SIGKILL
                    killed = True
                    continue
                await watch.wait(0.05)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    print(f"read {len(seen)} records before and after the kill")
    assert len(seen) > 8
    check_sequence([p for _, _, p in seen])
    payloads, end = await recovered_payloads(tmp_path, "always")
    assert payloads[: len(seen)] == [p for _, _, p in seen]
    assert end >= seen[-1][1]
    # After the recovery the same records sit at the same offsets.
    with SubLogReader(tmp_path, Stream.RAW, 1, 4) as reader:
        again = [(r.offset, r.next_offset, r.payload) for r in reader.read(0, 1 << 30)]
    assert again[: len(seen)] == seen



@pytest.mark.parametrize("settled", [False, True], ids=["changed-just-now", "settled"])
async def test_a_consumer_finds_a_new_writers_sublog_whatever_the_directorys_mtime(
    tmp_path: Path, settled: bool
) -> None:
    """A consumer lists a partition's directory again only when its mtime moved, and
    trusts an unchanged mtime only once it is SETTLED_NS old: an entry created within
    the same timestamp tick as the listing (simulated by putting the mtime back) is
    still found."""
    from evd.core.log import TopicPartition
    from evd.core.log.embedded.consumer import EmbeddedConsumer

    w0, w1 = open_log(tmp_path, writer=0), open_log(tmp_path, writer=1)
    consumer = EmbeddedConsumer(tmp_path, None)
    try:
        await w0.append(Stream.RAW, 2, raw_record("from-w0"))
        directory = tmp_path / "log" / Stream.RAW / "0002"
        if settled:
            old = time.time_ns() - 10_000_000_000
            os.utime(directory, ns=(old, old))
        mtime = directory.stat().st_mtime_ns
        consumer.assign([TopicPartition(Stream.RAW, 2)])
        assert [r.sublog.source for r in await consumer.fetch(1 << 20, 1.0)] == [0]
        await w1.append(Stream.RAW, 2, raw_record("from-w1"))  # a new sub-log: w001
        if not settled:
            os.utime(directory, ns=(mtime, mtime))  # as if created in the same tick
        got = await consumer.fetch(1 << 20, 2.0)
        assert [r.sublog.source for r in got] == [1]
    finally:
        await consumer.close()
        await w0.close()
        await w1.close()
