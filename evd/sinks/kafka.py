"""Kafka (``type: kafka``): every item as one record of a topic another team consumes.

A record's value is the item's row of evd.sinks.rows, the same JSON bytes as a
line of the lake's NDJSON, of stdout and an item of a webhook body. Its key
is the item's ``user_id`` (events, late, sessions, and dead letters whose item
has one), a chart row's ``track_id``, or none (a dead letter without a
user): the default partitioner then keeps one user's items in one partition,
in log order. Its header ``evd-stream`` names the stream (``events``, ``late``,
``sessions``, ``charts``, ``dead_letter``), so one topic can take several.

The topic is ``topic`` as configured (no ``kafka.topic_prefix``: it is the
consuming team's name). With ``create_topic`` it is created at start when it
is missing, with ``partitions`` partitions (0: ``log.partitions``) and
``kafka.replication_factor``. The cluster is ours (``kafka.bootstrap_servers``
and ``kafka.security``) unless the sink names its own ``bootstrap_servers``;
that one is reached without ``kafka.security``, so our credentials are never
sent to another team's brokers.

A write sends every record, then waits for every acknowledgement (``acks=all``;
idempotent when ``kafka.idempotence``). A batch not acknowledged within
``timeout_s``, a broker error, or a cluster that cannot be reached raises a
retriable SinkError. A cluster down at start does not stop evd: the sink
connects at its first write then, and its lag grows meanwhile. A record larger
than the producer or the broker accepts raises a PermanentSinkError: the batch
is dead-lettered (the records sent before it stay written).

Delivery is at least once: a retried batch may be written twice, whole or in
part (records acknowledged before the failure), so consumers deduplicate by the
items' ids (event_id, session_id, the chart key).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
    for_code,
)

from evd.core.config import KafkaConfig, KafkaSecurityConfig, SinkConfig
from evd.core.errors import ConfigError
from evd.core.log import Stream
from evd.core.log.kafka.topics import client_options
from evd.sinks import rows
from evd.sinks.base import Batch, PermanentSinkError, Sink, SinkContext, SinkError

__all__ = ["STREAM_HEADER", "KafkaSink", "KafkaSinkConfig"]

log = logging.getLogger(__name__)

#: The record header naming the stream an item came from.
STREAM_HEADER = "evd-stream"


class KafkaSinkConfig(SinkConfig, tag="kafka", kw_only=True):
    """A topic another team consumes: one record per row, keyed by user (or track)."""

    #: The topic's full name (kafka.topic_prefix is not added: the topic is theirs).
    topic: str
    #: Partitions when evd creates the topic (0: log.partitions).
    partitions: int = 0
    #: Create the topic at start when it is missing.
    create_topic: bool = True
    #: Their cluster, when it is not ours (None: kafka.bootstrap_servers with
    #: kafka.security; a cluster of its own is reached without kafka.security,
    #: so our credentials never go to it).
    bootstrap_servers: list[str] | None = None
    #: How long the producer waits to fill a batch.
    linger_ms: int = 5
    #: A batch not acknowledged within this fails (retried).
    timeout_s: float = 30.0

    def validate(self, where: str) -> None:
        # Kafka's own rule for topic names: these characters, at most 249, not . or ..
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", self.topic) or self.topic in (".", ".."):
            raise ConfigError(
                f"{where}.topic: name the topic (up to 249 letters, digits, '.', '_' and '-')"
            )
        if self.partitions < 0:
            raise ConfigError(f"{where}.partitions: must be >= 0 (0: log.partitions)")
        if self.bootstrap_servers is not None and not self.bootstrap_servers:
            raise ConfigError(f"{where}.bootstrap_servers: list at least one host:port, or null")
        if self.linger_ms < 0:
            raise ConfigError(f"{where}.linger_ms: must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError(f"{where}.timeout_s: must be > 0")


class _User(msgspec.Struct):
    """The one field of a dead letter's item the key needs."""

    user_id: str | None = None


_user = msgspec.json.Decoder(_User).decode


class KafkaSink(Sink):
    """Produces every item to ``cfg.topic``; see the module docstring."""

    def __init__(self, cfg: KafkaSinkConfig, ctx: SinkContext) -> None:
        self.cfg = cfg
        self.window_ms = ctx.chart_window_ms
        k = ctx.kafka if ctx.kafka is not None else KafkaConfig()
        self.idempotence = k.idempotence
        self.replication_factor = k.replication_factor
        if cfg.bootstrap_servers is not None:
            k = msgspec.structs.replace(
                k, bootstrap_servers=list(cfg.bootstrap_servers), security=KafkaSecurityConfig()
            )
        self.servers = list(k.bootstrap_servers)
        self.options = client_options(k)
        self.partitions = cfg.partitions or ctx.partitions
        self.where = f"kafka sink {cfg.name!r}: topic {cfg.topic}"
        self._producer: AIOKafkaProducer | None = None
        self._closed = False

    async def start(self) -> None:
        """Create the topic if missing and start the producer; a cluster that cannot
        be reached is only logged: the first write tries again (and is retried)."""
        if self._closed:
            raise RuntimeError(f"kafka sink {self.cfg.name!r} is closed; it cannot start again")
        if self._producer is not None:
            raise RuntimeError(f"kafka sink {self.cfg.name!r} was already started")
        try:
            await self._connect()
        except SinkError as exc:
            log.warning("%s; connecting again at the first write", exc)

    async def _connect(self) -> None:
        """One attempt at the topic and a started producer, each request within
        timeout_s. aiokafka times its requests out itself: cancelling it halfway
        through connecting can leave a connection open."""
        cfg = self.cfg
        producer = AIOKafkaProducer(
            **self.options,
            client_id=f"evd.{cfg.name}",
            acks="all",
            enable_idempotence=self.idempotence,
            linger_ms=cfg.linger_ms,
            request_timeout_ms=int(cfg.timeout_s * 1000),
        )
        try:
            if cfg.create_topic:
                await self._create_topic()
            await producer.start()
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, KafkaError | TimeoutError):
                raise SinkError(
                    f"{self.where}: cannot reach {', '.join(self.servers)} (requests time out"
                    f" after {cfg.timeout_s:g} s): {type(exc).__name__}: {exc}"
                ) from None
            raise
        self._producer = producer

    async def _create_topic(self) -> None:
        admin = AIOKafkaAdminClient(
            **self.options, request_timeout_ms=int(self.cfg.timeout_s * 1000)
        )
        try:
            await admin.start()
            if self.cfg.topic in await admin.list_topics():
                return
            topic = NewTopic(self.cfg.topic, self.partitions, self.replication_factor)
            resp = await admin.create_topics([topic])
            # aiokafka returns the answer as is: its per-topic errors are ours to raise.
            for _, code, *_ in resp.topic_errors:
                error = for_code(code)
                if code and error is not TopicAlreadyExistsError:  # another pod won the race
                    raise error(f"creating the topic with {self.partitions} partitions")
            log.info("%s: created with %d partitions", self.where, self.partitions)
        finally:
            await admin.close()

    async def write(self, batch: Batch) -> None:
        """Produce one record per item and wait until all are acknowledged."""
        if self._closed:
            raise RuntimeError(f"kafka sink {self.cfg.name!r}: write() after close()")
        if not batch.count:
            return
        if self._producer is None:
            await self._connect()
        producer = self._producer
        assert producer is not None
        # Encoding a batch of thousands of rows takes milliseconds: off the loop.
        records = await asyncio.to_thread(self._records, batch)
        headers = [(STREAM_HEADER, batch.stream.encode())]
        acks: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                for key, value in records:
                    acks.append(await producer.send(self.cfg.topic, value, key=key, headers=headers))
                answers = await asyncio.gather(*acks, return_exceptions=True)
        except BaseException as exc:
            acked = _acked(acks)
            _abandon(acks)
            if isinstance(exc, TimeoutError):
                raise SinkError(
                    f"{self.where}: {len(records) - acked} of {len(records)} records not"
                    f" acknowledged within {self.cfg.timeout_s:g} s"
                ) from None
            if isinstance(exc, KafkaError):
                raise _error(self.where, [exc]) from None
            raise
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:
            raise _error(self.where, failed)

    async def close(self) -> None:
        """Stop the producer (idempotent)."""
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

    def describe(self) -> dict[str, Any]:
        return {"type": "kafka", "topic": self.cfg.topic, "bootstrap_servers": self.servers}

    def _records(self, batch: Batch) -> list[tuple[bytes | None, bytes]]:
        """(key, row JSON) of every item, in the order of rows.json_lines."""
        lines = rows.json_lines(batch, self.window_ms)
        values = lines[:-1].split(b"\n") if lines else []
        return list(zip(_keys(batch), values, strict=True))


def _keys(batch: Batch) -> list[bytes | None]:
    """Every item's key (see the module docstring), in the order of its row."""
    stream = batch.stream
    if stream in rows.EVENT_STREAMS:
        return [ev.user_id.encode() for b in batch.values for ev in b.events]
    if stream == Stream.SESSIONS:
        return [s.user_id.encode() for s in rows.sessions(batch.values)]
    if stream == Stream.CHARTS:
        return [row.track_id.encode() for _, row in rows.chart_rows(batch.values)]
    keys: list[bytes | None] = []
    for d in batch.values:
        try:
            user = _user(d.event).user_id
        except msgspec.DecodeError:  # not an object, or user_id not a string
            user = None
        keys.append(None if user is None else user.encode())
    return keys


def _error(where: str, errors: list[BaseException]) -> SinkError:
    """The SinkError for failed sends: permanent when a record is too large (a
    retry would fail the same way), else retriable."""
    exc = next((e for e in errors if isinstance(e, MessageSizeTooLargeError)), errors[0])
    message = f"{where}: {type(exc).__name__}: {exc}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more records failed)"
    if isinstance(exc, MessageSizeTooLargeError):
        return PermanentSinkError(message)
    return SinkError(message)


def _acked(acks: list[asyncio.Future[Any]]) -> int:
    return sum(1 for a in acks if a.done() and not a.cancelled() and a.exception() is None)


def _abandon(acks: list[asyncio.Future[Any]]) -> None:
    """Let go of a failed batch's acknowledgements (it is written again whole):
    pending ones are cancelled, failed ones retrieved, so asyncio reports none
    as an exception never retrieved."""
    for ack in acks:
        if not ack.cancel() and not ack.cancelled():
            ack.exception()
