"""The embedded log's Consumer: every writer's sub-logs of the assigned partitions.

A partition of the embedded log is the set of its writers' sub-logs
(evd.core.log.embedded.sublog); a consumer keeps one position per sub-log, reads each up
to its writer's published durable end, and waits for new data on a
DurableWatch (inotify) instead of polling. Sub-logs appear when a writer first
appends to a partition; the consumer finds them when it looks for data (a
``stat`` of ``<log>/_sublogs``, which every writer appends a byte to when it
opens a sub-log; the partition directories are listed again only when it grew).

Committed offsets live in ``<data_dir>/log/<stream>/consumers/<name>/<partition:04d>.json``
(``{"w000": offset, ...}``), one file per partition: a partition is consumed by one
process at a time, so no two processes write the same file. A commit writes the
files of the partitions whose offsets moved, each replaced atomically, with one
fsync per directory. A consumer that
committed is *registered*: retention (evd.core.log.embedded.retention) keeps every segment
it has not passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import orjson

from evd.core.files import write_atomic_all
from evd.core.log import Consumer, ConsumerRecord, InvalidOffset, Lag, SubLog, TopicPartition
from evd.core.log.embedded.sublog import (
    SubLogReader,
    parse_writer,
    sublogs_generation,
    writer_name,
    writers_of,
)
from evd.core.log.embedded.wake import DurableWatch

__all__ = ["EmbeddedConsumer", "committed_offsets", "consumer_names"]

log = logging.getLogger(__name__)

CONSUMERS_DIR = "consumers"
#: Most often a consumer looks for new sub-logs while data keeps coming: a new
#: writer's sub-log is found within this, which bounds how far (in wall-clock
#: time) the other sub-logs can be read ahead of it. A look is one stat of
#: ``<log>/_sublogs`` (sublog.announce_sublogs); the directories of the assigned
#: partitions are listed only when it grew (or does not exist yet).
DISCOVER_INTERVAL_S = 0.02
#: A pending seek to the oldest retained record (of a sub-log not found yet).
_BEGINNING = -1
#: Smallest share of a fetch's max_bytes one sub-log gets when several have data.
MIN_SHARE_BYTES = 64 * 1024

_new_record = tuple.__new__


#: Per log root: when ``<log>/_sublogs`` was last read in this process, and its size.
_generations: dict[str, tuple[float, int | None]] = {}


def _generation(log_root: str, now: float) -> int | None:
    """sublogs_generation, read at most once per DISCOVER_INTERVAL_S per process:
    every consumer of the process shares the one ``stat`` (a value read before a
    listing is still read before it)."""
    cached = _generations.get(log_root)
    if cached is not None and now - cached[0] < DISCOVER_INTERVAL_S:
        return cached[1]
    generation = sublogs_generation(log_root)
    _generations[log_root] = (now, generation)
    return generation


def _check_name(name: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"consumer name {name!r}: use letters, digits, '-' and '_'")
    return name


def offsets_path(data_dir: Path, name: str, stream: str, partition: int) -> Path:
    return data_dir / "log" / stream / CONSUMERS_DIR / _check_name(name) / f"{partition:04d}.json"


def consumer_names(data_dir: str | Path, stream: str) -> list[str]:
    """The consumers registered for ``stream`` (those that committed)."""
    directory = Path(data_dir) / "log" / stream / CONSUMERS_DIR
    try:
        return sorted(d.name for d in directory.iterdir() if d.is_dir())
    except FileNotFoundError:
        return []


def committed_offsets(data_dir: str | Path, name: str, stream: str, partition: int) -> dict[int, int]:
    """Writer id -> committed offset of consumer ``name`` for one partition ({}: none)."""
    path = offsets_path(Path(data_dir), name, stream, partition)
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    out: dict[int, int] = {}
    for key, offset in raw.items():
        writer = parse_writer(key)
        if writer is not None:
            out[writer] = int(offset)
    return out


class EmbeddedConsumer(Consumer):
    """Consumer ``name`` of the embedded log under ``data_dir``, in any process.

    ``name`` None: an anonymous reader that cannot commit (nothing registered,
    retention ignores it). ``reset``: what a position that retention deleted
    does: ``"earliest"`` moves it to the oldest retained record (logged);
    ``"error"`` raises InvalidOffset from fetch. A sub-log starts where a seek
    put it, else at the consumer's committed offset, else at its oldest
    retained record (aiokafka's group consumer with ``auto_offset_reset="earliest"``).
    """

    def __init__(
        self,
        data_dir: str | Path,
        name: str | None,
        *,
        reset: Literal["earliest", "error"] = "error",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.name = None if name is None else _check_name(name)
        self.reset = reset
        self._assigned: set[TopicPartition] = set()
        self._readers: dict[SubLog, SubLogReader] = {}
        self._positions: dict[SubLog, int] = {}
        #: Seeks not yet applied to a known sub-log (it may appear later).
        self._seeks: dict[SubLog, int | None] = {}
        self._watch: DurableWatch | None = None
        self._next_discover = 0.0
        self._log_root = str(self.data_dir / "log")
        #: sublogs_generation when the assigned partitions were last listed (None: never).
        self._listed_at: int | None = None
        #: A wake-up came while discovery was rate-limited (a new sub-log may wait).
        self._undiscovered_wake = False
        self._start = 0  # round-robin start among the sub-logs with data
        self._commit_lock = asyncio.Lock()
        #: What this consumer last wrote per partition (a partition's file has one
        #: writer at a time: the process that consumes it).
        self._written: dict[tuple[str, int], dict[int, int]] = {}
        self._closed = False

    # -- assignment and positions -------------------------------------------------

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._check_open()
        self._assigned = {TopicPartition(*tp) for tp in partitions}
        for sublog in [s for s in self._readers if (s.stream, s.partition) not in self._assigned]:
            self._readers.pop(sublog).close()
            self._positions.pop(sublog, None)
        if self._watch is None:
            self._watch = DurableWatch(self.data_dir)  # before the first look: no wake-up missed
        self._discover(force=True)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def _discover(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_discover:
            return
        self._next_discover = now + DISCOVER_INTERVAL_S
        self._undiscovered_wake = False
        generation = _generation(self._log_root, now)
        if not force and generation is not None and generation == self._listed_at:
            return  # no writer opened a sub-log since the last listing
        self._listed_at = generation
        for stream, partition in self._assigned:
            for writer in writers_of(self.data_dir, stream, partition):
                sublog = SubLog(stream, partition, writer)
                if sublog in self._readers:
                    continue
                reader = SubLogReader(self.data_dir, stream, partition, writer)
                self._readers[sublog] = reader
                seek = self._seeks.pop(sublog, None)
                if seek is None and self.name is not None:
                    seek = committed_offsets(self.data_dir, self.name, stream, partition).get(writer)
                if seek is None or seek == _BEGINNING:
                    seek = reader.first_offset()
                self._positions[sublog] = seek

    def seek(self, sublog: SubLog, offset: int) -> None:
        sublog = SubLog(*sublog)
        if offset < 0:
            raise InvalidOffset(f"offset {offset} of {sublog} is negative")
        if sublog in self._readers:
            self._positions[sublog] = offset
        else:
            self._seeks[sublog] = offset

    def seek_to_beginning(self, sublog: SubLog) -> None:
        sublog = SubLog(*sublog)
        reader = self._readers.get(sublog)
        if reader is None:
            self._seeks[sublog] = _BEGINNING
        else:
            self._positions[sublog] = reader.first_offset()

    def positions(self) -> dict[SubLog, int]:
        return dict(self._positions)

    def backlog(self) -> set[SubLog]:
        self._discover()
        return {s for s, r in self._readers.items() if r.durable_end() > self._positions[s]}

    # -- fetching ------------------------------------------------------------------

    async def fetch(self, max_bytes: int = 1 << 20, timeout: float = 1.0) -> list[ConsumerRecord]:
        self._check_open()
        if self._watch is None:
            raise RuntimeError("fetch before assign()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            records = self._read_some(max_bytes)
            if records:
                return records
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            if self._undiscovered_wake:
                # No further wake-up may come for a sub-log that appeared since the
                # last discovery: look again as soon as the interval allows.
                remaining = min(remaining, max(self._next_discover - time.monotonic(), 0.0))
            if await self._watch.wait(remaining):
                self._undiscovered_wake = True
            self._discover()

    def _read_some(self, max_bytes: int) -> list[ConsumerRecord]:
        self._discover()
        ready = [
            (sublog, reader) for sublog, reader in self._readers.items()
            if reader.durable_end() != self._positions[sublog]
        ]
        if not ready:
            return []
        share = max(max_bytes // len(ready), MIN_SHARE_BYTES)
        self._start = (self._start + 1) % len(ready)
        out: list[ConsumerRecord] = []
        budget = max_bytes
        for sublog, reader in ready[self._start :] + ready[: self._start]:
            if budget <= 0:
                break
            position = self._positions[sublog]
            try:
                records = reader.read(position, min(share, budget))
            except InvalidOffset:
                first = reader.first_offset()
                if self.reset != "earliest" or position >= first:
                    raise
                log.warning(
                    "consumer %s: %s offset %d was deleted by retention; reading on from %d",
                    self.name, sublog, position, first,
                )
                self._positions[sublog] = position = first
                try:
                    # Read on now: the data is there, and no wake-up will say so.
                    records = reader.read(position, min(share, budget))
                except InvalidOffset:
                    continue  # deleted again meanwhile: the next pass resets again
            # (offset, next_offset, payload) after the sub-log: a ConsumerRecord built
            # without the namedtuple's Python-level __new__.
            out.extend([_new_record(ConsumerRecord, (sublog, *record)) for record in records])
            if records:
                self._positions[sublog] = records[-1].next_offset
                budget -= records[-1].next_offset - position
        return out

    async def end_offsets(self) -> dict[SubLog, int]:
        self._discover(force=True)
        return {s: r.durable_end() for s, r in self._readers.items()}

    def lag(self, now: float | None = None) -> Lag:
        now = time.time() if now is None else now
        behind = 0
        oldest: float | None = None
        for sublog, reader in self._readers.items():
            position = self._positions[sublog]
            gap = reader.durable_end() - position
            if gap <= 0:
                continue
            behind += gap
            stamp = reader.timestamp_at(position)
            if stamp is not None and (oldest is None or stamp < oldest):
                oldest = stamp
        seconds = 0.0 if oldest is None else max(0.0, now - oldest / 1000)
        return Lag(behind, seconds)

    # -- offsets ----------------------------------------------------------------------

    async def commit(self, offsets: Mapping[SubLog, int] | None = None) -> None:
        self._check_open()
        if self.name is None:
            raise RuntimeError("an anonymous consumer cannot commit")
        name = self.name
        chosen = dict(self._positions if offsets is None else offsets)
        by_partition: dict[tuple[str, int], dict[int, int]] = {}
        for sublog, offset in chosen.items():
            by_partition.setdefault((sublog.stream, sublog.partition), {})[sublog.source] = offset
        loop = asyncio.get_running_loop()
        # One commit at a time: each merges into what the one before it wrote.
        async with self._commit_lock:
            writes: list[tuple[Path, bytes]] = []
            written: dict[tuple[str, int], dict[int, int]] = {}
            for key, new in sorted(by_partition.items()):
                stream, partition = key
                before = self._written.get(key)
                if before is None:
                    before = committed_offsets(self.data_dir, name, stream, partition)
                merged = before | new
                if merged == before and key in self._written:
                    continue  # nothing moved since this consumer wrote it
                written[key] = merged
                data = orjson.dumps({writer_name(w): o for w, o in sorted(merged.items())})
                writes.append((offsets_path(self.data_dir, name, stream, partition), data))
            if writes:
                await loop.run_in_executor(None, _write_offsets, writes)
                self._written.update(written)

    async def register(self) -> None:
        """An empty offsets file for each assigned partition without one: a registered
        consumer with no commit for a sub-log holds it whole (evd.core.log.embedded.retention)."""
        self._check_open()
        if self.name is None:
            raise RuntimeError("an anonymous consumer cannot register")
        loop = asyncio.get_running_loop()
        async with self._commit_lock:
            paths = [offsets_path(self.data_dir, self.name, stream, partition)
                     for stream, partition in sorted(self._assigned)]
            writes = [(path, b"{}") for path in paths if not path.exists()]
            if writes:
                await loop.run_in_executor(None, _write_offsets, writes)

    async def committed(self) -> dict[SubLog, int]:
        if self.name is None:
            return {}
        out: dict[SubLog, int] = {}
        for stream, partition in sorted(self._assigned):
            for writer, offset in committed_offsets(self.data_dir, self.name, stream, partition).items():
                out[SubLog(stream, partition, writer)] = offset
        return out

    # -- lifecycle ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"consumer {self.name!r} is closed")

    async def close(self) -> None:
        self._closed = True
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        if self._watch is not None:
            self._watch.close()
            self._watch = None


def _write_offsets(writes: list[tuple[Path, bytes]]) -> None:
    """Each offsets file replaced atomically and durably; one fsync per directory."""
    for directory in {path.parent for path, _ in writes}:
        os.makedirs(directory, exist_ok=True)
    write_atomic_all(writes)
