"""The Kafka log's Consumer: assigned partitions, offsets committed under the consumer's own group id.

A Kafka partition plays the part of the embedded log's set of sub-logs, so every
record's sub-log has source 0, and offsets are Kafka's (``next_offset`` = offset + 1).
Reading consumers commit under group id ``{prefix}{name}`` with no membership, so
Kafka's tools show every sink's and the processors' offsets and lag by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.structs import OffsetAndMetadata

from evd.core.errors import LogUnavailable
from evd.core.log import Consumer, ConsumerRecord, InvalidOffset, Lag, SubLog, TopicPartition
from evd.core.log.kafka.topics import (
    END_PROBE_TIMEOUT_S,
    STREAMS,
    client_options,
    start_with_retry,
    topic_name,
)

if TYPE_CHECKING:
    from evd.config import Config

__all__ = ["KafkaConsumer"]

log = logging.getLogger(__name__)


class KafkaConsumer(Consumer):
    """Consumer ``name`` of the Kafka log: assigned partitions, offsets committed
    under group id ``{prefix}{name}`` (no membership).

    ``name`` None: an anonymous reader that cannot commit. A partition starts
    where a seek put it, else at the committed offset, else at the oldest
    retained record. Lag is estimated: in bytes from the records behind and the
    mean size of those read so far (Kafka counts records, not bytes); in seconds
    from the timestamp of the last record read, when more are behind it.
    """

    def __init__(self, cfg: Config, name: str | None) -> None:
        self.k = cfg.kafka
        self.name = name
        self._consumer = AIOKafkaConsumer(
            **client_options(self.k),
            group_id=None if name is None else f"{self.k.topic_prefix}{name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=self.k.max_request_bytes,
            fetch_max_bytes=4 * self.k.max_request_bytes,
        )
        self._started = False
        self._assigned: set[TopicPartition] = set()
        self._streams = {topic_name(self.k, s): s for s in STREAMS}
        self._positions: dict[SubLog, int] = {}
        self._beginning: set[SubLog] = set()
        self._ends: dict[SubLog, int] = {}
        self._stamps: dict[SubLog, int] = {}
        self._record_bytes = 1024.0
        self._commit_lock = asyncio.Lock()
        #: Seeks not yet checked against their partition's records (at the next fetch).
        self._unchecked: set[SubLog] = set()
        #: An anonymous consumer whose fetches' high watermarks make end_offsets exact.
        self._probe: AIOKafkaConsumer | None = None
        self._probe_lock = asyncio.Lock()

    async def _ensure_started(self) -> None:
        if not self._started:
            await start_with_retry(self._consumer, self.k, f"consumer {self.name}")
            self._started = True
            self._apply_assignment()

    def _tp(self, sublog: SubLog | TopicPartition) -> KafkaTP:
        return KafkaTP(topic_name(self.k, sublog[0]), sublog[1])

    def _sublog(self, tp: KafkaTP) -> SubLog:
        return SubLog(self._streams[tp.topic], tp.partition, 0)

    def _apply_assignment(self) -> None:
        self._consumer.assign([self._tp(tp) for tp in sorted(self._assigned)])
        for sublog, offset in self._positions.items():
            self._consumer.seek(self._tp(sublog), offset)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        self._assigned = {TopicPartition(*tp) for tp in partitions}
        mine = {SubLog(s, p, 0) for s, p in self._assigned}
        self._positions = {s: o for s, o in self._positions.items() if s in mine}
        self._unchecked &= mine
        if self._started:
            self._apply_assignment()

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def _resolve(self) -> None:
        """Start, apply pending seeks to the beginning, learn every position."""
        await self._ensure_started()
        if self._beginning:
            tps = [self._tp(s) for s in self._beginning]
            self._beginning.clear()
            await self._consumer.seek_to_beginning(*tps)
        for tp in sorted(self._assigned):
            sublog = SubLog(tp.stream, tp.partition, 0)
            if sublog not in self._positions:
                self._positions[sublog] = await self._consumer.position(self._tp(tp))

    async def fetch(self, max_bytes: int = 1 << 20, timeout: float = 1.0) -> list[ConsumerRecord]:
        await self._resolve()
        if not self._assigned:
            await asyncio.sleep(timeout)
            return []
        if self._unchecked:
            await self._check_seeks()
        max_records = max(1, int(max_bytes / self._record_bytes))
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[ConsumerRecord] = []
        size = 0
        for tp, messages in batches.items():
            sublog = self._sublog(tp)
            for m in messages:
                out.append(ConsumerRecord(sublog, m.offset, m.offset + 1, m.value))
                size += len(m.value)
            if messages:
                self._positions[sublog] = messages[-1].offset + 1
                self._stamps[sublog] = messages[-1].timestamp
            end = self._consumer.highwater(tp)
            if end is not None:
                self._ends[sublog] = end
        if out:
            self._record_bytes = 0.8 * self._record_bytes + 0.2 * (size / len(out))
        return out

    def seek(self, sublog: SubLog, offset: int) -> None:
        sublog = SubLog(*sublog)
        if offset < 0:
            raise InvalidOffset(f"offset {offset} of {sublog} is negative")
        self._positions[sublog] = offset
        self._beginning.discard(sublog)
        self._unchecked.add(sublog)
        if self._started:
            self._consumer.seek(self._tp(sublog), offset)

    def seek_to_beginning(self, sublog: SubLog) -> None:
        sublog = SubLog(*sublog)
        self._positions.pop(sublog, None)
        self._beginning.add(sublog)
        self._unchecked.discard(sublog)

    async def _check_seeks(self) -> None:
        """InvalidOffset for a position a seek put before the oldest retained record
        or past the end (aiokafka would read on from the oldest, or wait there)."""
        sublogs = sorted(s for s in self._unchecked if (s.stream, s.partition) in self._assigned)
        if not sublogs:
            return
        tps = [self._tp(s) for s in sublogs]
        firsts = await self._consumer.beginning_offsets(tps)
        listed = await self._consumer.end_offsets(tps)
        # Only positions past the listed end need the exact end (the probe).
        past = {tp: listed[tp] for s, tp in zip(sublogs, tps, strict=True) if self._positions[s] > listed[tp]}
        ends = listed | await self._exact_ends(past)
        for sublog, tp in zip(sublogs, tps, strict=True):
            offset = self._positions[sublog]
            if not firsts[tp] <= offset <= ends[tp]:
                raise InvalidOffset(
                    f"offset {offset} of {sublog} is outside its records {firsts[tp]}..{ends[tp]}"
                )
            self._unchecked.discard(sublog)

    def positions(self) -> dict[SubLog, int]:
        return dict(self._positions)

    def backlog(self) -> set[SubLog]:
        return {s for s, o in self._positions.items() if self._ends.get(s, 0) > o}

    async def end_offsets(self) -> dict[SubLog, int]:
        await self._resolve()
        tps = [self._tp(tp) for tp in sorted(self._assigned)]
        if not tps:
            return {}
        ends = await self._exact_ends(await self._consumer.end_offsets(tps))
        for tp, end in ends.items():
            self._ends[self._sublog(tp)] = end
        return {self._sublog(tp): end for tp, end in ends.items()}

    async def _exact_ends(self, listed: Mapping[KafkaTP, int]) -> dict[KafkaTP, int]:
        """``listed`` (ListOffsets' latest offsets), each raised to the high watermark
        of a fetch at its end - 1. ListOffsets may answer less than the end: the
        Tansu broker answers the last record batch's base offset + 1; a fetch's
        high watermark is the end (and ListOffsets never answers more)."""
        ends = dict(listed)
        tps = [tp for tp, end in ends.items() if end > 0]
        if not tps:
            return ends
        async with self._probe_lock:  # one use of the probe's assignment at a time
            return await self._probe_ends(ends, tps)

    async def _probe_ends(self, ends: dict[KafkaTP, int], tps: list[KafkaTP]) -> dict[KafkaTP, int]:
        if self._probe is None:
            probe = AIOKafkaConsumer(
                **client_options(self.k), group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", max_partition_fetch_bytes=self.k.max_request_bytes,
            )
            await start_with_retry(probe, self.k, f"the end probe of consumer {self.name}")
            self._probe = probe
        probe = self._probe
        probe.assign(tps)  # fresh partition states: no high watermark known yet
        try:
            for tp in tps:
                probe.seek(tp, ends[tp] - 1)
            deadline = time.monotonic() + END_PROBE_TIMEOUT_S
            while missing := [tp for tp in tps if probe.highwater(tp) is None]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LogUnavailable(
                        f"kafka: no fetch answer for the end of {missing[0].topic}"
                        f"/{missing[0].partition} within {END_PROBE_TIMEOUT_S:g} s"
                    )
                await probe.getmany(*missing, timeout_ms=int(min(left, 0.1) * 1000) + 1)
            for tp in tps:
                ends[tp] = max(ends[tp], probe.highwater(tp))
        finally:
            probe.assign([])
        return ends

    async def commit(self, offsets: Mapping[SubLog, int] | None = None) -> None:
        if self.name is None:
            raise RuntimeError("an anonymous consumer cannot commit")
        await self._ensure_started()
        chosen = dict(self._positions if offsets is None else offsets)
        if not chosen:
            return
        async with self._commit_lock:
            await self._consumer.commit(
                {self._tp(s): OffsetAndMetadata(o, "") for s, o in chosen.items()}
            )

    async def committed(self) -> dict[SubLog, int]:
        if self.name is None:
            return {}
        await self._ensure_started()
        out: dict[SubLog, int] = {}
        for tp in sorted(self._assigned):
            offset = await self._consumer.committed(self._tp(tp))
            if offset is not None:
                out[SubLog(tp.stream, tp.partition, 0)] = offset
        return out

    def lag(self, now: float | None = None) -> Lag:
        behind = 0
        oldest: float | None = None
        for sublog, position in self._positions.items():
            gap = self._ends.get(sublog, position) - position
            if gap > 0:
                behind += gap
                stamp = self._stamps.get(sublog)
                if stamp is not None and (oldest is None or stamp < oldest):
                    oldest = stamp
        now = time.time() if now is None else now
        seconds = 0.0 if oldest is None else max(0.0, now - oldest / 1000)
        return Lag(int(behind * self._record_bytes), seconds)

    async def close(self) -> None:
        # Stopped even if never started: aiokafka reports an unclosed consumer when it is collected.
        self._started = False
        await self._consumer.stop()
        if self._probe is not None:
            probe, self._probe = self._probe, None
            await probe.stop()


