"""Configuration sections: msgspec Structs, every field with a default, unknown
keys errors.

These are the sections of the core (server, limits, log, processing, kafka,
...) and what every sink's section has in common (``SinkConfig``, its
``BatchConfig`` and ``RetryConfig``). Each sink type's own section lives in its
module beside the sink (evd.sinks.registry lists them); evd.config assembles
the whole ``Config`` from both and loads it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import msgspec

from evd.core.errors import ConfigError

MiB = 1024 * 1024


#: Every role of a server (server.roles).
ROLES: tuple[str, ...] = ("edge", "process", "deliver")


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are errors."""


class ServerConfig(Base):
    """Where and how the HTTP edge listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Worker processes; ``auto`` means one per CPU this process may run on.
    workers: int | Literal["auto"] = "auto"
    data_dir: str = "./evd-data"
    #: Seconds between SIGTERM (readyz failing) and closing the listeners, so a
    #: load balancer notices before connections are refused.
    drain_grace_s: float = 0.0
    #: Seconds in-flight requests get to finish after the listeners close.
    drain_timeout_s: float = 10.0
    #: What this server runs (``evd serve --roles``): ``edge`` ingests over HTTP,
    #: ``process`` runs the processors, ``deliver`` the sinks and the audit. Any
    #: subset other than all three needs ``log.backend: kafka``.
    roles: list[Literal["edge", "process", "deliver"]] = msgspec.field(
        default_factory=lambda: ["edge", "process", "deliver"]
    )


class LimitsConfig(Base):
    """Bounds on what one client can make the edge hold; each maps to a status code."""

    max_body_bytes: int = 5 * MiB  # 413
    max_decompressed_bytes: int = 20 * MiB  # 413, checked while inflating
    max_events_per_batch: int = 10_000  # 413
    max_header_bytes: int = 16 * 1024  # 431
    header_timeout_s: float = 10.0  # connection closed (408) when headers are this slow
    body_timeout_s: float = 30.0  # connection closed (408) when the body is this slow
    keepalive_timeout_s: float = 75.0  # idle keep-alive connections are closed
    #: After an error answered before the request was read to its end, evd reads
    #: and discards what the client still sends for this long at most, then closes
    #: (a close with unread input resets the connection, and the answer with it).
    linger_timeout_s: float = 5.0
    #: ... and this many bytes at most.
    linger_max_bytes: int = 16 * MiB
    #: A POST waiting longer than this for its group commit is answered 503.
    commit_timeout_s: float = 10.0
    #: Per API key token bucket, events per second; 0 disables (429 + Retry-After).
    rate_limit_events_per_s: float = 0.0
    #: Bucket size in events; 0 means one second's worth.
    rate_limit_burst: int = 0


class AuthConfig(Base):
    """API keys: plain strings or ``sha256:<hex>`` digests of the key."""

    enabled: bool = True
    keys: list[str] = msgspec.field(default_factory=lambda: ["evd-dev-key"])


class RetentionConfig(Base):
    """When segments of streams that no consumer has registered for are deleted.

    A stream with registered consumers (a sink, the processor's snapshots) keeps
    a segment until every one of them is past it, whatever these say.
    """

    #: Segments whose newest record is older than this are deleted (0: never).
    max_age_s: float = 7 * 24 * 3600.0
    #: Per sub-log, the oldest segments are deleted above this many bytes (0: no cap).
    max_bytes: int = 0


class LogConfig(Base):
    """The raw log and output streams."""

    backend: Literal["embedded", "kafka"] = "embedded"
    partitions: int = 8
    fsync: Literal["always", "interval", "never"] = "always"
    fsync_interval_ms: int = 100
    segment_bytes: int = 64 * MiB
    #: Journal bytes (fsync: always) after which partition files are fsynced and
    #: the journal dropped. Smaller checkpoints are smaller fsync bursts, so a
    #: shorter latency tail (docs/performance.md).
    checkpoint_bytes: int = 8 * MiB
    #: Bytes the edge appended that wait for a flush; above it POSTs are shed with
    #: 503 (the processors' own appends are bounded by them: one group in flight each).
    max_pending_bytes: int = 64 * MiB
    #: Disk the whole log (every stream, every writer) may use; above it POSTs
    #: are shed with 503 + Retry-After until retention frees space. 0: no fixed cap.
    max_bytes: int = 0
    #: Free space the log always leaves on its filesystem (503 below it).
    min_free_bytes: int = 1024 * MiB
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)


class IngestConfig(Base):
    """Edge enrichment."""

    #: When |received_at - sent_at| exceeds this, event time is corrected by it.
    clock_skew_threshold_ms: int = 60_000
    #: Event ids remembered per worker to answer ``duplicates`` at the edge.
    edge_dedup_ids: int = 100_000


class ProcessingConfig(Base):
    """Stream processing: dedup, event-time watermarks, sessions (ARCHITECTURE.md)."""

    #: An event id seen again within this long (by received_at) is a duplicate.
    dedup_window_s: float = 24 * 3600.0
    #: ... and at most this many ids are remembered per partition (oldest go first).
    dedup_max_ids: int = 5_000_000
    #: Watermark of a sub-log = newest event time seen minus this.
    max_out_of_orderness_ms: int = 5_000
    #: A sub-log with nothing to read for this long stops holding the watermark back;
    #: a partition idle this long advances its watermark with the wall clock.
    idle_timeout_ms: int = 10_000
    #: An event behind the watermark by at most this still counts: sessions and
    #: chart rows it changes are emitted again (revision + 1); an older one is
    #: late (the ``late`` stream, counted). Emitted sessions and windows are kept
    #: this long for it.
    allowed_lateness_ms: int = 3_600_000
    #: A gap between a user's events longer than this starts a new session.
    session_gap_ms: int = 30 * 60 * 1000
    #: Events the time-ordered buffer of one partition holds at most; above it
    #: the watermark is forced forward (counted in evd_processor_forced_total).
    max_buffered_events: int = 1_000_000


class ChartsConfig(Base):
    """Real-time charts: tumbling event-time windows of plays."""

    #: Window length; the API's ``window`` is a multiple of it.
    window_s: int = 60
    #: Closed windows kept for the API (its largest ``window``).
    retention_s: int = 24 * 3600


class SnapshotConfig(Base):
    """Processor state snapshots (state + the input offsets they cover)."""

    #: Seconds between snapshots of each partition (and one at clean shutdown).
    interval_s: float = 10.0
    #: Where snapshots are kept ("": ``{data_dir}/state``). With process groups,
    #: a directory every process pod mounts (a shared volume), so that the pod
    #: a partition moves to finds its snapshot.
    dir: str = ""


class KafkaSecurityConfig(Base):
    """Passed through to aiokafka (its ``security_protocol``, ``sasl_*`` and SSL context)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    #: PEM files for TLS: the CA to trust, and a client certificate and key (mTLS).
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


class KafkaConfig(Base):
    """The Kafka log (``log.backend: kafka``): a topic per stream, ``{topic_prefix}{stream}``,
    each with ``log.partitions`` partitions."""

    bootstrap_servers: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:9092"])
    topic_prefix: str = "evd."
    replication_factor: int = 1
    #: Create the stream topics that are missing at start.
    create_topics: bool = True
    #: The idempotent producer (no duplicates from its own retries). Brokers that
    #: lack InitProducerId (the Tansu test broker) need false; the processors'
    #: dedup absorbs the duplicates a retry may then write.
    idempotence: bool = True
    #: How long the producer waits to fill a batch, and a batch's size: one
    #: request's records (one per partition) travel together.
    linger_ms: int = 2
    max_batch_bytes: int = 1 * MiB
    #: Largest produce request (a micro-batch record must fit in it).
    max_request_bytes: int = 8 * MiB
    #: An append the broker has not acknowledged within this is answered 503 +
    #: Retry-After (the client retries; dedup absorbs a late ack).
    ack_timeout_s: float = 5.0
    #: After a failed append, new requests are refused with 503 at once for this
    #: long (a broker that is down is not waited for by every request).
    unavailable_s: float = 1.0
    #: Start-up: how long to keep trying to reach the brokers.
    connect_timeout_s: float = 30.0
    #: Consumer groups (processors, deliverers): a member silent this long is
    #: removed and its partitions move to the others.
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    #: On revocation, how long a processor may take to snapshot its partitions
    #: before it lets them go without (the next owner then replays more).
    revoke_budget_s: float = 5.0
    security: KafkaSecurityConfig = msgspec.field(default_factory=KafkaSecurityConfig)


#: Output streams a sink can take.
SINK_STREAMS = ("events", "late", "sessions", "charts", "dead_letter")
EVENT_TYPES = ("play", "pause", "resume", "seek", "skip", "end")
#: Consumer (and Kafka group) names the pipeline uses itself; a sink may not take them.
RESERVED_NAMES = ("processor", "audit", "processors", "deliverers")
#: Sinks a config may list: the metrics keep slots for each (evd.sinks.metrics
#: MAX_SINKS) and one for the audit stage.
MAX_SINKS = 15


class BatchConfig(Base):
    """When the delivery loop hands a sink what it gathered: the first bound reached."""

    #: Items (events, sessions, chart rows, dead letters) in one write.
    max_events: int = 10_000
    #: Log bytes those items came from (bounds the memory a pending batch pins).
    max_bytes: int = 8 * MiB
    #: Seconds the oldest gathered item waits at most.
    max_age_s: float = 1.0


class RetryConfig(Base):
    """Retries of a failed write: exponential back-off with full jitter."""

    #: Writes of one batch before it goes to dead_letter (1: no retry).
    max_attempts: int = 10
    #: Back-off before the first retry; doubled at each retry ...
    initial_backoff_s: float = 0.2
    #: ... up to this.
    max_backoff_s: float = 10.0


class SinkConfig(Base, tag_field="type", kw_only=True):
    """Common to every sink: a name (its consumer name: own offsets, own metrics),
    the streams it takes, an optional event type filter, batching and retries.

    A sink type's section subclasses it with ``tag="<type>"`` and checks its
    own fields in ``validate``; validate_sinks checks these common ones.
    """

    name: str
    streams: list[str] = msgspec.field(default_factory=lambda: ["events"])
    #: Only these event types of events/late (None: all).
    event_types: list[str] | None = None
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)

    def validate(self, where: str) -> None:
        """Raise ConfigError naming ``{where}.<key>`` when a field of the sink
        type's own is wrong (called after the common fields were checked)."""


def validate_sinks(sinks: Sequence[SinkConfig]) -> None:
    """Check what every sink has (names, streams, event types, batch, retry),
    then each sink's own ``validate``; ConfigError names ``sinks.<i>.<key>``."""
    if len(sinks) > MAX_SINKS:
        raise ConfigError(f"sinks: at most {MAX_SINKS} sinks")
    names: set[str] = set()
    for i, sink in enumerate(sinks):
        where = f"sinks.{i}"
        if not sink.name or not sink.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}.name: use letters, digits, '-' and '_'")
        if sink.name in RESERVED_NAMES:
            raise ConfigError(f"{where}.name: {sink.name!r} is used by evd itself")
        if sink.name in names:
            raise ConfigError(f"{where}.name: {sink.name!r} is used by another sink")
        names.add(sink.name)
        if not sink.streams:
            raise ConfigError(f"{where}.streams: name at least one stream")
        for stream in sink.streams:
            if stream not in SINK_STREAMS:
                raise ConfigError(
                    f"{where}.streams: {stream!r} is not one of {', '.join(SINK_STREAMS)}"
                )
        if len(set(sink.streams)) != len(sink.streams):
            raise ConfigError(f"{where}.streams: a stream is named twice")
        for t in sink.event_types or ():
            if t not in EVENT_TYPES:
                raise ConfigError(f"{where}.event_types: {t!r} is not one of {', '.join(EVENT_TYPES)}")
        b, r = sink.batch, sink.retry
        if b.max_events < 1 or b.max_bytes < 1 or b.max_age_s <= 0:
            raise ConfigError(f"{where}.batch: max_events, max_bytes and max_age_s must be > 0")
        if r.max_attempts < 1:
            raise ConfigError(f"{where}.retry.max_attempts: must be >= 1")
        if r.initial_backoff_s < 0 or r.max_backoff_s < r.initial_backoff_s:
            raise ConfigError(f"{where}.retry: need 0 <= initial_backoff_s <= max_backoff_s")
        sink.validate(where)


def validate_kafka(k: KafkaConfig) -> None:
    """Check the kafka section; ConfigError names ``kafka.<key>``."""
    if not k.bootstrap_servers:
        raise ConfigError("kafka.bootstrap_servers: list at least one host:port")
    if not re.fullmatch(r"[A-Za-z0-9._-]*", k.topic_prefix):
        raise ConfigError("kafka.topic_prefix: use letters, digits, '.', '_' and '-'")
    if k.replication_factor < 1:
        raise ConfigError("kafka.replication_factor: must be >= 1")
    for name in ("ack_timeout_s", "unavailable_s", "connect_timeout_s", "revoke_budget_s"):
        if getattr(k, name) <= 0:
            raise ConfigError(f"kafka.{name}: must be > 0")
    for name in ("linger_ms", "max_batch_bytes", "max_request_bytes"):
        if getattr(k, name) < 0:
            raise ConfigError(f"kafka.{name}: must be >= 0")
    if k.heartbeat_interval_ms >= k.session_timeout_ms:
        raise ConfigError("kafka.heartbeat_interval_ms: must be below kafka.session_timeout_ms")
    sec = k.security
    if sec.protocol.startswith("SASL") and (sec.sasl_mechanism is None or sec.sasl_username is None):
        raise ConfigError("kafka.security: SASL needs sasl_mechanism and sasl_username")
