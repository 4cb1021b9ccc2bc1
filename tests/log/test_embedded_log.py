"""The embedded log on real files: append/read, fsync policies, segment rolls,
consumer offsets, bounds and I/O failure, and recovery of a torn tail, including
a hypothesis round-trip property of the framing."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from evd.core.errors import ConfigError, LogOverloaded, LogUnavailable
from evd.core.log import partition_for, partitions_for
from evd.core.log.embedded.framing import HEADER, frame, scan_frames
from evd.core.log.embedded.layout import read_partition
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.streams import Stream

#: Hypothesis runs with a fixed seed, printed below; override with EVD_TEST_SEED.
HYPOTHESIS_SEED = int(os.environ.get("EVD_TEST_SEED") or 20240501)


def segments(root: Path, stream: str, partition: int, writer: int = 0) -> list[Path]:
    return sorted((root / "log" / stream / f"{partition:04d}" / f"w{writer:03d}").glob("*.seg"))


async def read_all(
    lg: EmbeddedLog, stream: str, partition: int, max_bytes: int = 1 << 20
) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    for _ in range(100_000):  # bounded: each read returns at least one record or []
        records = await lg.read(stream, partition, offset, max_bytes)
        if not records:
            return out
        out.extend(r.payload for r in records)
        offset = records[-1].next_offset
    raise AssertionError("read did not reach the end")


def open_log(root: Path, **kw: object) -> EmbeddedLog:
    lg = EmbeddedLog(root, kw.pop("partitions", 4), **kw)  # type: ignore[arg-type]
    lg.open()
    return lg


# -- basics -------------------------------------------------------------------------------


def test_frame_is_length_crc_payload() -> None:
    data = frame(b"hello")
    assert len(data) == HEADER.size + 5
    spans, end = scan_frames(data + frame(b"") + frame(b"x" * 300))
    assert end == len(data) + HEADER.size * 2 + 300
    assert spans[0] == (HEADER.size, HEADER.size + 5)
    assert len(spans) == 3


@pytest.mark.parametrize(
    ("key", "partitions", "expected"),
    [
        ("hashed_user_abc123", 8, 7),
        ("hashed_user_abc123", 64, 47),
        ("user-1", 8, 4),
        ("user-1", 1000, 524),
        ("user-2", 8, 6),
        ("ü-user", 8, 6),
        ("", 8, 0),
    ],
)
def test_partition_for_is_pinned(key: str, partitions: int, expected: int) -> None:
    # Users are placed by this mapping: a change of it moves every user away from
    # the history already in a data_dir, so the values are pinned, not recomputed.
    assert partition_for(key, partitions) == expected
    assert partitions_for([key, key], partitions) == [expected, expected]


def test_partitions_spread_users() -> None:
    assert set(partitions_for([f"user-{i}" for i in range(200)], 8)) == set(range(8))


async def test_append_read_offsets_and_end_offset(tmp_path: Path) -> None:
    lg = open_log(tmp_path)
    try:
        payloads = [b"a", b"bb" * 100, b"", b"ccc"]
        await asyncio.gather(*(lg.append(Stream.RAW, 1, p) for p in payloads))
        records = await lg.read(Stream.RAW, 1, 0)
        assert [r.payload for r in records] == payloads
        # Offsets are byte positions: contiguous, each record's next is the following's start.
        assert records[0].offset == 0
        for a, b in itertools.pairwise(records):
            assert a.next_offset == b.offset
        assert lg.end_offset(Stream.RAW, 1) == records[-1].next_offset
        assert lg.end_offset(Stream.RAW, 2) == 0 and await lg.read(Stream.RAW, 2, 0) == []
        # Reading from the middle starts at that record.
        assert [r.payload for r in await lg.read(Stream.RAW, 1, records[2].offset)] == payloads[2:]
        # A small max_bytes still returns at least one whole record.
        assert (await lg.read(Stream.RAW, 1, records[1].offset, 10))[0].payload == payloads[1]
    finally:
        await lg.close()


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
async def test_fsync_policies_keep_records_after_close(tmp_path: Path, policy: str) -> None:
    lg = open_log(tmp_path, fsync=policy, fsync_interval_ms=20)
    payloads = {p: [f"{policy}-{p}-{i}".encode() for i in range(50)] for p in range(4)}
    futures = [lg.append(Stream.RAW, p, x) for p, xs in payloads.items() for x in xs]
    await asyncio.gather(*futures)
    await lg.close()
    with pytest.raises(LogUnavailable):
        lg.append(Stream.RAW, 0, b"after close")

    reopened = open_log(tmp_path, fsync=policy)
    try:
        for p, xs in payloads.items():
            assert await read_all(reopened, Stream.RAW, p) == xs
            # A reader in another process sees the same records.
            assert [r.payload for r in read_partition(tmp_path, Stream.RAW, p)] == xs
    finally:
        await reopened.close()


class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


async def test_fsync_always_syncs_before_the_append_completes(tmp_path: Path) -> None:
    lg = open_log(tmp_path, fsync="always")
    counter = lg.fsync_fn = CountingFsync()
    try:
        await lg.append(Stream.RAW, 0, b"x")
        assert counter.calls >= 1
    finally:
        await lg.close()


async def test_appends_arriving_on_the_next_loop_passes_join_the_flush(tmp_path: Path) -> None:
    """Group commit waits while each event-loop pass brings more appends."""
    lg = open_log(tmp_path)
    loop = asyncio.get_running_loop()
    try:
        futures = [lg.append_all([(Stream.RAW, 0, b"first")])]
        # Two later passes of the loop each append once more (a request arriving
        # while the first one is being answered): all three share one flush.
        loop.call_soon(
            lambda: loop.call_soon(lambda: futures.append(lg.append_all([(Stream.RAW, 1, b"third")])))
        )
        loop.call_soon(lambda: futures.append(lg.append_all([(Stream.RAW, 0, b"second")])))
        await asyncio.gather(*futures)
        assert len(futures) == 3 and futures[0] is futures[1] is futures[2]
    finally:
        await lg.close()


async def test_a_steady_stream_of_appends_does_not_hold_a_flush_back(tmp_path: Path) -> None:
    """Waiting for more appends is bounded in loop passes: a flush starts anyway."""
    lg = open_log(tmp_path)
    loop = asyncio.get_running_loop()
    futures = [lg.append_all([(Stream.RAW, 0, b"0")])]
    done = loop.create_future()

    def append_next(i: int) -> None:
        futures.append(lg.append_all([(Stream.RAW, 0, str(i).encode())]))
        if i < 50:
            loop.call_soon(append_next, i + 1)
        else:
            done.set_result(None)

    try:
        loop.call_soon(append_next, 1)
        await done
        await asyncio.gather(*futures)
        # The first flush took the appends of its first few passes, then started.
        assert futures[0] is futures[1] and futures[0] is not futures[10]
        assert await read_all(lg, Stream.RAW, 0) == [str(i).encode() for i in range(51)]
    finally:
        await lg.close()


async def test_fsync_interval_syncs_in_the_background(tmp_path: Path) -> None:
    lg = open_log(tmp_path, fsync="interval", fsync_interval_ms=20)
    counter = lg.fsync_fn = CountingFsync()
    try:
        await lg.append(Stream.RAW, 0, b"x")
        for _ in range(500):  # up to 5 s on a loaded machine; usually 20 ms
            if counter.calls:
                break
            await asyncio.sleep(0.01)
        assert counter.calls >= 1
    finally:
        await lg.close()


async def test_flush_waits_for_an_interval_sync_already_running(tmp_path: Path) -> None:
    # The interval sync takes the dirty partitions; a flush beside it found none
    # left and returned before their fsync ended (and close then cancelled that
    # sync, closing its fds while the fsync threads still used them).
    lg = open_log(tmp_path, fsync="interval", fsync_interval_ms=10)
    started = threading.Event()
    done: list[int] = []

    def slow_fsync(fd: int) -> None:
        started.set()
        time.sleep(0.2)
        os.fsync(fd)
        done.append(fd)

    lg.fsync_fn = slow_fsync  # type: ignore[method-assign]
    try:
        await lg.append(Stream.RAW, 0, b"x")
        for _ in range(500):
            if started.is_set():
                break
            await asyncio.sleep(0.01)
        assert started.is_set()
        await lg.flush()
        assert done, "flush returned while the partition's fsync was still running"
    finally:
        await lg.close()


async def test_fsync_never_does_not_sync_appends(tmp_path: Path) -> None:
    lg = open_log(tmp_path, fsync="never")
    counter = lg.fsync_fn = CountingFsync()
    try:
        for i in range(5):
            await lg.append(Stream.RAW, 0, b"x%d" % i)
        await asyncio.sleep(0.05)
        assert counter.calls == 0
    finally:
        await lg.close()


async def test_segments_roll_by_size_and_read_across_them(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=4096)
    payloads = [bytes([i % 256]) * 500 for i in range(40)]  # about 20 KB
    try:
        for p in payloads:
            await lg.append(Stream.RAW, 0, p)
        assert await read_all(lg, Stream.RAW, 0) == payloads
        assert await read_all(lg, Stream.RAW, 0, max_bytes=700) == payloads
    finally:
        await lg.close()
    segs = segments(tmp_path, Stream.RAW, 0)
    assert len(segs) >= 5
    # Each segment is named by its first byte's offset: the names are contiguous.
    base = 0
    for seg in segs:
        assert int(seg.stem) == base
        assert seg.stat().st_size <= 4096 + 508  # one frame may cross the size, not more
        base += seg.stat().st_size
    reopened = open_log(tmp_path, segment_bytes=4096)
    try:
        assert await read_all(reopened, Stream.RAW, 0) == payloads
        await reopened.append(Stream.RAW, 0, b"after reopen")
        assert (await read_all(reopened, Stream.RAW, 0))[-1] == b"after reopen"
    finally:
        await reopened.close()


async def test_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    lg = open_log(tmp_path, segment_bytes=4096)
    try:
        big = os.urandom(10_000)
        await lg.append(Stream.RAW, 0, b"small")
        await lg.append(Stream.RAW, 0, big)
        await lg.append(Stream.RAW, 0, b"after")
        assert await read_all(lg, Stream.RAW, 0, max_bytes=100) == [b"small", big, b"after"]
    finally:
        await lg.close()


async def test_partition_out_of_range_is_refused(tmp_path: Path) -> None:
    lg = open_log(tmp_path, partitions=2)
    try:
        with pytest.raises(ValueError):
            lg.append(Stream.RAW, 2, b"x")
    finally:
        await lg.close()


async def test_pending_bytes_bound_sheds_appends(tmp_path: Path) -> None:
    lg = open_log(tmp_path, max_pending_bytes=1000)
    try:
        futures = []
        with pytest.raises(LogOverloaded):
            for _ in range(100):  # no await: the group commit cannot run in between
                futures.append(lg.append(Stream.RAW, 0, b"x" * 300))
        assert 1 <= len(futures) <= 5
        await asyncio.gather(*futures)
        # Taken again once the pending appends are flushed.
        await lg.append(Stream.RAW, 0, b"later")
        assert len(await read_all(lg, Stream.RAW, 0)) == len(futures) + 1
    finally:
        await lg.close()


async def test_a_stages_own_appends_do_not_shed_the_edge(tmp_path: Path) -> None:
    """max_pending_bytes bounds what the edge appended; the stages' appends
    (internal) bound themselves and neither count nor are refused."""
    lg = open_log(tmp_path, max_pending_bytes=1000)
    try:
        internal = [lg.append(Stream.RAW, 1, b"y" * 300, internal=True) for _ in range(10)]
        assert lg.pending_bytes > 1000 and not lg.overloaded
        edge = [lg.append(Stream.RAW, 0, b"x" * 300) for _ in range(4)]  # 1,232 bytes with frames
        assert lg.overloaded
        with pytest.raises(LogOverloaded):
            lg.append(Stream.RAW, 0, b"x")
        internal.append(lg.append(Stream.RAW, 1, b"y", internal=True))  # still taken
        await asyncio.gather(*internal, *edge)
        assert not lg.overloaded
    finally:
        await lg.close()


def failing_fsync(fd: int) -> None:
    raise OSError(errno.EIO, "injected EIO")


@pytest.mark.parametrize("policy", ["always", "interval"])
async def test_io_error_turns_the_log_read_only(tmp_path: Path, policy: str) -> None:
    lg = open_log(tmp_path, fsync=policy, fsync_interval_ms=10)
    failures: list[BaseException] = []
    lg.on_failure = failures.append
    try:
        await lg.append(Stream.RAW, 0, b"durable")
        lg.fsync_fn = failing_fsync
        if policy == "always":
            with pytest.raises(LogUnavailable):
                await lg.append(Stream.RAW, 0, b"lost")
        else:
            await lg.append(Stream.RAW, 0, b"written")
            for _ in range(500):
                if failures:
                    break
                await asyncio.sleep(0.01)
        assert len(failures) == 1
        assert isinstance(failures[0], OSError) and failures[0].errno == errno.EIO
        assert not lg.writable
        with pytest.raises(LogUnavailable):
            lg.append(Stream.RAW, 1, b"refused")
        assert (await lg.read(Stream.RAW, 0, 0))[0].payload == b"durable"
    finally:
        await lg.close()


# -- recovery of a torn tail ---------------------------------------------------------------


async def write_records(root: Path, payloads: list[bytes], **kw: object) -> None:
    lg = open_log(root, **kw)
    try:
        for p in payloads:
            await lg.append(Stream.RAW, 0, p)
    finally:
        await lg.close()


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda last: last, id="at-a-record-boundary"),
        pytest.param(lambda last: last + 3, id="inside-length"),
        pytest.param(lambda last: last + 6, id="inside-crc"),
        pytest.param(lambda last: last + HEADER.size, id="header-only"),
        pytest.param(lambda last: last + HEADER.size + 17, id="inside-payload"),
        pytest.param(lambda last: last + HEADER.size + 99, id="one-byte-short"),
    ],
)
async def test_truncated_last_record_is_dropped_on_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: object
) -> None:
    payloads = [b"r%02d-" % i + b"p" * 96 for i in range(10)]
    assert {len(p) for p in payloads} == {100}
    await write_records(tmp_path, payloads)
    seg = segments(tmp_path, Stream.RAW, 0)[-1]
    last_start = seg.stat().st_size - (HEADER.size + 100)
    size = cut(last_start)  # type: ignore[operator]
    os.truncate(seg, size)
    dropped = size - last_start

    with caplog.at_level(logging.WARNING, logger="evd.core.log.embedded"):
        lg = open_log(tmp_path)
    try:
        warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
        if dropped:
            expected = f"log raw/0: truncated {dropped} bytes of torn or corrupt tail"
            assert warnings == [f"{expected} at offset {last_start} (writer 0)"]
        else:
            assert warnings == []
        assert seg.stat().st_size == last_start
        assert lg.end_offset(Stream.RAW, 0) == last_start
        assert await read_all(lg, Stream.RAW, 0) == payloads[:-1]
        await lg.append(Stream.RAW, 0, b"new")
        assert await read_all(lg, Stream.RAW, 0) == payloads[:-1] + [b"new"]
    finally:
        await lg.close()


@pytest.mark.parametrize("damage", ["garbage-tail", "flipped-payload-byte", "huge-length"])
async def test_corrupt_last_record_is_dropped_on_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    payloads = [b"rec-%d" % i for i in range(5)]
    await write_records(tmp_path, payloads)
    seg = segments(tmp_path, Stream.RAW, 0)[-1]
    data = bytearray(seg.read_bytes())
    keep = payloads
    if damage == "garbage-tail":
        data += b"\x07\x00\x00\x00garbage"
    elif damage == "flipped-payload-byte":
        data[-1] ^= 0x01
        keep = payloads[:-1]
    else:
        data += (2**31).to_bytes(4, "little") + b"\x00" * 12
    seg.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="evd.core.log.embedded"):
        lg = open_log(tmp_path)
    try:
        assert any("truncated" in r.getMessage() for r in caplog.records)
        assert await read_all(lg, Stream.RAW, 0) == keep
        await lg.append(Stream.RAW, 0, b"new")
        assert await read_all(lg, Stream.RAW, 0) == keep + [b"new"]
    finally:
        await lg.close()


async def test_any_flipped_byte_of_the_last_record_drops_only_it(
    tmp_path: Path, rng: random.Random
) -> None:
    payloads = [rng.randbytes(rng.randrange(1, 200)) for _ in range(6)]
    await write_records(tmp_path, payloads)
    seg = segments(tmp_path, Stream.RAW, 0)[-1]
    good = seg.read_bytes()
    last_start = len(good) - (HEADER.size + len(payloads[-1]))
    for _ in range(20):
        damaged = bytearray(good)
        pos = rng.randrange(last_start, len(good))
        damaged[pos] ^= 1 << rng.randrange(8)
        seg.write_bytes(bytes(damaged))
        lg = open_log(tmp_path)
        try:
            assert await read_all(lg, Stream.RAW, 0) == payloads[:-1], pos
            assert lg.end_offset(Stream.RAW, 0) == last_start
        finally:
            await lg.close()
        assert seg.stat().st_size == last_start


# -- property: framing round trip and recovery of any truncation -------------------------


async def _round_trip(root: Path, appends: list[tuple[int, bytes]], cut: float) -> None:
    kw: dict[str, Any] = {"partitions": 3, "segment_bytes": 512, "fsync": "never"}
    lg = open_log(root, **kw)
    try:
        # Appends in groups, so some share a group commit and some do not.
        for i in range(0, len(appends), 3):
            await asyncio.gather(*(lg.append(Stream.RAW, p, x) for p, x in appends[i : i + 3]))
    finally:
        await lg.close()
    expected = {p: [x for q, x in appends if q == p] for p in range(3)}

    lg = open_log(root, **kw)
    try:
        for p in range(3):
            assert await read_all(lg, Stream.RAW, p) == expected[p]
            assert await read_all(lg, Stream.RAW, p, max_bytes=64) == expected[p]
    finally:
        await lg.close()

    # Truncate the last segment of the first partition with records anywhere.
    p = appends[0][0]
    seg = segments(root, Stream.RAW, p)[-1]
    base, size = int(seg.stem), seg.stat().st_size
    new_size = int(size * cut)
    os.truncate(seg, new_size)
    # Records before the segment survive, and whole frames of it up to the cut.
    survivors, pos = [], 0
    for x in expected[p]:
        end = pos + HEADER.size + len(x)
        if end > base + new_size:
            break
        survivors.append(x)
        pos = end
    lg = open_log(root, **kw)
    try:
        assert await read_all(lg, Stream.RAW, p) == survivors
        assert lg.end_offset(Stream.RAW, p) == pos
        assert seg.stat().st_size == pos - base
        await lg.append(Stream.RAW, p, b"after-recovery")
        assert await read_all(lg, Stream.RAW, p) == survivors + [b"after-recovery"]
        for q in range(3):
            if q != p:
                assert await read_all(lg, Stream.RAW, q) == expected[q]
    finally:
        await lg.close()


@seed(HYPOTHESIS_SEED)
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    appends=st.lists(
        st.tuples(st.integers(0, 2), st.binary(min_size=0, max_size=300)), min_size=1, max_size=40
    ),
    cut=st.floats(0.0, 1.0),
)
def test_log_round_trip_and_truncation_property(
    appends: list[tuple[int, bytes]], cut: float
) -> None:
    print(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_round_trip(Path(tmp), appends, cut))


async def test_fewer_partitions_than_on_disk_is_a_config_error(tmp_path: Path) -> None:
    lg = open_log(tmp_path, partitions=4)
    await lg.append(Stream.RAW, 3, b"x")
    await lg.close()
    shrunk = EmbeddedLog(tmp_path, 2)
    with pytest.raises(ConfigError, match="log.partitions"):
        shrunk.open()
    grown = open_log(tmp_path, partitions=8)  # growing is allowed
    await grown.close()


async def test_a_partition_that_cannot_be_created_refuses_only_its_appends(tmp_path: Path) -> None:
    lg = open_log(tmp_path, partitions=4)
    try:
        await lg.append(Stream.RAW, 0, b"ok")
        (tmp_path / "log" / Stream.RAW / "0003").write_bytes(b"")  # a file where the directory goes
        with pytest.raises(LogUnavailable, match="cannot open raw/3"):
            lg.append(Stream.RAW, 3, b"x")
        assert lg.writable
        await lg.append(Stream.RAW, 1, b"still fine")
    finally:
        await lg.close()
