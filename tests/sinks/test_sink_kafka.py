"""The kafka sink against a real broker on 127.0.0.1 (Tansu, the ``kafka_broker``
fixture): the records it writes (the rows' JSON, keys, the stream header), the
topic it creates, the delivery loop's filters in front of it, what it retries
(no broker, a broker that never answers) and what it gives up on (a record too
large), and its configuration."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from evdtest import sink_context

from bench.tansu import Broker
from evd.config import load_config
from evd.core.config import BatchConfig, KafkaConfig, RetryConfig
from evd.core.errors import ConfigError
from evd.core.log import records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.records import Kind
from evd.core.log.streams import Stream
from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    DeadLetter,
    Event,
    EventsBatch,
    Playback,
    Session,
    SessionsBatch,
)
from evd.sinks import rows
from evd.sinks.audit.ledger import Ledger
from evd.sinks.base import Batch, PermanentSinkError, SinkError
from evd.sinks.delivery import DeliveryLoop
from evd.sinks.kafka import STREAM_HEADER, KafkaSink, KafkaSinkConfig
from evd.sinks.registry import build_sink

pytestmark = pytest.mark.workers_independent

PARTITIONS = 2
WINDOW_MS = 60_000
T = datetime(2025, 12, 1, 10, 0, tzinfo=UTC)
T_MS = 1_764_583_200_000
TRACK = "spotify:track:" + "a" * 22
#: How long a test waits for records to be readable from the broker.
READ_TIMEOUT_S = 10.0

Record = tuple[bytes | None, bytes, dict[str, bytes]]


def event(eid: str, user: str, kind: str = "play") -> Event:
    return Event(eid, T, user, TRACK, Playback(0, 1000), kind)  # type: ignore[arg-type]


def events_value(ids: list[str], users: list[str], kinds: list[str] | None = None,
                 raw_offset: int = -1) -> EventsBatch:
    kinds = kinds or ["play"] * len(ids)
    evs = [event(i, u, k) for i, u, k in zip(ids, users, kinds, strict=True)]
    return EventsBatch(T_MS + 5, evs, 0, [], {}, 0, raw_offset)


def session(sid: str, user: str) -> Session:
    return Session(sid, user, T_MS, T_MS + 1000, 2, 1, 1, 1000, "SE", None, [])


def kafka_section(bootstrap: str) -> KafkaConfig:
    # Tansu has no InitProducerId: the idempotent producer cannot start against it.
    return KafkaConfig(bootstrap_servers=[bootstrap], idempotence=False)


def make_sink(tmp_path: Path, bootstrap: str, topic: str, **options: Any) -> KafkaSink:
    cfg = KafkaSinkConfig(name="team", topic=topic, **options)
    ctx = sink_context(tmp_path, 0, 1, PARTITIONS, WINDOW_MS, kafka=kafka_section(bootstrap))
    return KafkaSink(cfg, ctx)


@pytest.fixture
async def sink(tmp_path: Path, kafka_broker: Broker, kafka_prefix: str) -> AsyncIterator[KafkaSink]:
    s = make_sink(tmp_path, kafka_broker.bootstrap, f"{kafka_prefix}team-a.plays", partitions=3)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def read_topic(bootstrap: str, topic: str, n: int) -> list[Record]:
    """The first ``n`` records of ``topic`` (every partition) as (key, value, headers);
    fails after READ_TIMEOUT_S, and when more than ``n`` arrive."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Record] = []
    try:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while len(out) < n:
            assert time.monotonic() < deadline, f"read {len(out)} of {n} records in time"
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                out.extend((m.key, m.value, dict(m.headers)) for m in messages)
        # Every write was acknowledged before reading: a record beyond n would be here.
        for messages in (await consumer.getmany(timeout_ms=200)).values():
            out.extend((m.key, m.value, dict(m.headers)) for m in messages)
    finally:
        await consumer.stop()
    assert len(out) == n, out
    return out


# -- what a write produces ----------------------------------------------------------------


async def test_events_land_as_rows_keyed_by_user(
    sink: KafkaSink, kafka_broker: Broker
) -> None:
    value = events_value(["e1", "e2", "e3", "e4"], ["u1", "u2", "u1", "u3"],
                         ["play", "skip", "pause", "play"])
    batch = Batch("events", [value], 4, 400)
    await sink.write(batch)
    found = await read_topic(kafka_broker.bootstrap, sink.cfg.topic, 4)
    lines = rows.json_lines(batch, WINDOW_MS).splitlines()
    # Byte for byte the rows of stdout, the lake and webhooks (partitions interleave freely).
    assert sorted(v for _, v, _ in found) == sorted(lines)
    for key, value_bytes, headers in found:
        row = json.loads(value_bytes)
        assert key == row["user_id"].encode()
        assert headers == {STREAM_HEADER: b"events"}
    # One user's items share a partition (the key), so they stay in log order.
    assert [json.loads(v)["event_id"] for k, v, _ in found if k == b"u1"] == ["e1", "e3"]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([sink.cfg.topic])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 3  # the sink's partitions, not log.partitions


async def test_other_streams_keys_and_headers(sink: KafkaSink, kafka_broker: Broker) -> None:
    other = "spotify:track:" + "b" * 22
    await sink.write(Batch("sessions", [SessionsBatch([session("s1", "u7"), session("s2", "u8")])],
                           2, 200))
    await sink.write(Batch("charts", [ChartsBatch(1, 0, [ChartRow(T_MS, "SE", other, 5),
                                                         ChartRow(T_MS, None, TRACK, 2, 4)])], 2, 100))
    letters = [
        DeadLetter(T_MS, 3, "bad", b'{"event_id":"x1","user_id":"u9"}'),
        DeadLetter(T_MS, 4, "bad", b'{"event_id":"x2","user_id":42}'),
        DeadLetter(T_MS, 5, "bad", b"not json"),
    ]
    await sink.write(Batch("dead_letter", letters, 3, 100))
    found = await read_topic(kafka_broker.bootstrap, sink.cfg.topic, 7)
    got = {(json.loads(v).get("session_id") or json.loads(v).get("track_id")
            or json.loads(v)["index"]): (k, h[STREAM_HEADER]) for k, v, h in found}
    assert got == {
        "s1": (b"u7", b"sessions"), "s2": (b"u8", b"sessions"),
        other: (other.encode(), b"charts"), TRACK: (TRACK.encode(), b"charts"),
        3: (b"u9", b"dead_letter"), 4: (None, b"dead_letter"), 5: (None, b"dead_letter"),
    }
    charts = {json.loads(v)["track_id"]: json.loads(v) for _, v, h in found
              if h[STREAM_HEADER] == b"charts"}
    assert all(c["window_end"] == c["window_start"] + WINDOW_MS for c in charts.values())
    assert {t: c["revision"] for t, c in charts.items()} == {other: 0, TRACK: 4}


async def test_an_empty_batch_writes_nothing(sink: KafkaSink, kafka_broker: Broker) -> None:
    await sink.write(Batch("events", [events_value([], [])], 0, 10))
    await sink.write(Batch("events", [events_value(["e1"], ["u1"])], 1, 100))
    assert len(await read_topic(kafka_broker.bootstrap, sink.cfg.topic, 1)) == 1


# -- through the delivery loop -------------------------------------------------------------


async def test_the_loops_streams_and_event_types_filter_what_is_produced(
    tmp_path: Path, kafka_broker: Broker, kafka_prefix: str
) -> None:
    lg = EmbeddedLog(tmp_path, PARTITIONS, writer=0, fsync="never")
    await lg.start()
    kinds = ["play", "skip", "play", "end"]
    await lg.append(Stream.EVENTS, 0, records.encode_events(
        Kind.EVENTS, T_MS, events_value(["p1", "x1", "p2", "x2"], ["u1", "u1", "u2", "u2"],
                                        kinds, raw_offset=0)))
    await lg.append(Stream.EVENTS, 1, records.encode_events(
        Kind.EVENTS, T_MS, events_value(["p3", "x3"], ["u3", "u3"], ["play", "seek"],
                                        raw_offset=0)))
    await lg.append(Stream.LATE, 0, records.encode_events(
        Kind.LATE, T_MS, events_value(["l1"], ["u4"], raw_offset=1)))
    sink_cfg = KafkaSinkConfig(name="plays", topic=f"{kafka_prefix}plays",
                               streams=["events"], event_types=["play"])
    ctx = sink_context(tmp_path, 0, 1, PARTITIONS, WINDOW_MS, kafka=kafka_section(
        kafka_broker.bootstrap))
    sink = build_sink(sink_cfg, ctx)
    assert isinstance(sink, KafkaSink)
    ledger = Ledger(tmp_path)
    loop = DeliveryLoop(
        name=sink_cfg.name, sink=sink, consumer=EmbeddedConsumer(tmp_path, sink_cfg.name),
        producer=lg, ledger=ledger, streams=sink_cfg.streams, partitions=list(range(PARTITIONS)),
        batch=BatchConfig(max_events=100, max_bytes=1 << 20, max_age_s=0.05),
        retry=RetryConfig(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02),
        event_types=sink_cfg.event_types,
    )
    task = asyncio.create_task(loop.run())
    try:
        deadline = time.monotonic() + READ_TIMEOUT_S
        while loop.delivered < 3:
            assert time.monotonic() < deadline, "delivery did not finish in time"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
    finally:
        loop.stop()
        await asyncio.wait_for(task, READ_TIMEOUT_S)
        await loop.consumer.close()
        await ledger.close()
        await lg.close()
    found = await read_topic(kafka_broker.bootstrap, sink_cfg.topic, 3)
    assert {json.loads(v)["event_id"]: k for k, v, _ in found} == {
        "p1": b"u1", "p2": b"u2", "p3": b"u3",  # no skip/end/seek, nothing of late
    }
    assert loop.retries == 0 and loop.dead_lettered == 0


# -- failures --------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: How soon a write with timeout_s=0.5 must have failed: long for 0.5 s on a busy
#: machine, short of aiokafka's own 40 s request timeout (not what ended it).
GAVE_UP_WITHIN_S = 15.0


async def test_no_broker_is_a_retriable_error_not_a_failed_start(tmp_path: Path) -> None:
    s = make_sink(tmp_path, f"127.0.0.1:{closed_port()}", "team-a.plays", timeout_s=0.5)
    started = time.monotonic()
    await s.start()  # logged: evd starts while a team's cluster is down
    with pytest.raises(SinkError) as caught:
        await s.write(Batch("events", [events_value(["e1"], ["u1"])], 1, 100))
    await s.close()
    assert caught.value.retriable and not isinstance(caught.value, PermanentSinkError)
    assert "team-a.plays" in str(caught.value)
    assert time.monotonic() - started < GAVE_UP_WITHIN_S


async def test_a_broker_that_never_answers_fails_within_timeout_s(tmp_path: Path) -> None:
    handlers: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append((task, writer))
        await reader.read()  # takes the requests, answers none, until the client leaves

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        s = make_sink(tmp_path, f"127.0.0.1:{port}", "team-a.plays", timeout_s=0.5)
        await s.start()
        started = time.monotonic()
        with pytest.raises(SinkError, match=r"cannot reach .* after 0\.5 s") as caught:
            await s.write(Batch("events", [events_value(["e1"], ["u1"])], 1, 100))
        assert time.monotonic() - started < GAVE_UP_WITHIN_S
        assert caught.value.retriable
        await s.close()
    finally:
        server.close()
        for _, writer in handlers:
            writer.close()
        await asyncio.wait_for(asyncio.gather(*(t for t, _ in handlers)), 5)
        await server.wait_closed()
    assert handlers  # it did connect


async def test_a_broker_gone_after_start_fails_the_write_within_timeout_s(
    tmp_path: Path, kafka_prefix: str
) -> None:
    broker = Broker(log_path=tmp_path / "broker.log").start()  # its own: this test stops it
    try:
        s = make_sink(tmp_path, broker.bootstrap, f"{kafka_prefix}plays", timeout_s=0.5)
        await s.start()
        await s.write(Batch("events", [events_value(["e1"], ["u1"])], 1, 100))
        assert broker.proc is not None
        broker.proc.kill()  # a crash (Tansu takes 5 s to stop on SIGTERM with clients left)
        broker.proc.wait(5)
        started = time.monotonic()
        with pytest.raises(SinkError) as caught:
            await s.write(Batch("events", [events_value(["e2", "e3"], ["u1", "u2"])], 2, 200))
        assert time.monotonic() - started < GAVE_UP_WITHIN_S
        assert caught.value.retriable and not isinstance(caught.value, PermanentSinkError)
        await asyncio.wait_for(s.close(), 5)
    finally:
        broker.stop()


async def test_a_record_too_large_is_dead_lettered_at_once(sink: KafkaSink) -> None:
    huge = DeadLetter(T_MS, 0, "bad", b"x" * (1 << 20) + b"!")  # rows above 1 MiB: refused
    with pytest.raises(PermanentSinkError, match="MessageSizeTooLarge"):
        await sink.write(Batch("dead_letter", [huge], 1, 1 << 20))


# -- configuration ------------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "evd.yaml"
    path.write_text(text)
    return path


def test_a_yaml_config_with_a_kafka_sink_decodes(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, """
kafka: {idempotence: false}
sinks:
  - name: plays
    type: kafka
    topic: team-a.plays
    streams: [events, late]
    event_types: [play]
    bootstrap_servers: ["127.0.0.1:19092"]
    timeout_s: 2.5
  - {name: charts, type: kafka, topic: team-b.charts, streams: [charts]}
"""), environ={})
    plays, charts = cfg.sinks
    assert plays == KafkaSinkConfig(
        name="plays", topic="team-a.plays", streams=["events", "late"], event_types=["play"],
        bootstrap_servers=["127.0.0.1:19092"], timeout_s=2.5,
    )
    assert isinstance(charts, KafkaSinkConfig)
    assert (charts.partitions, charts.create_topic, charts.bootstrap_servers, charts.linger_ms,
            charts.timeout_s) == (0, True, None, 5, 30.0)
    ctx = sink_context(tmp_path, 0, 1, 8, WINDOW_MS, kafka=cfg.kafka)
    sink = build_sink(plays, ctx)
    assert isinstance(sink, KafkaSink)
    assert sink.describe() == {"type": "kafka", "topic": "team-a.plays",
                               "bootstrap_servers": ["127.0.0.1:19092"]}
    assert "security_protocol" in sink.options and sink.options["security_protocol"] == "PLAINTEXT"
    assert build_sink(charts, ctx).partitions == 8  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("{name: k, type: kafka}", "sinks.0.topic: missing required field"),
        ("{name: k, type: kafka, topic: ''}", "sinks.0.topic"),
        ("{name: k, type: kafka, topic: 'team a'}", "sinks.0.topic"),
        ("{name: k, type: kafka, topic: '..'}", "sinks.0.topic"),
        ("{name: k, type: kafka, topic: t, partitions: -1}", "sinks.0.partitions"),
        ("{name: k, type: kafka, topic: t, bootstrap_servers: []}", "sinks.0.bootstrap_servers"),
        ("{name: k, type: kafka, topic: t, timeout_s: 0}", "sinks.0.timeout_s"),
        ("{name: k, type: kafka, topic: t, linger_ms: -1}", "sinks.0.linger_ms"),
        ("{name: k, type: kafka, topic: t, streams: [raw]}", "sinks.0.streams"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, entry: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        load_config(write_config(tmp_path, f"sinks: [{entry}]\n"), environ={})
