"""Topics of the Kafka log: names, client options (security), creation, connecting with retries.

Every stream is a topic ``{kafka.topic_prefix}{stream}`` with ``log.partitions``
partitions; the same settings reach every aiokafka client through ``client_options``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from evd.core.config import KafkaConfig
from evd.core.errors import LogUnavailable
from evd.core.log.streams import Stream

__all__ = ["STREAMS", "client_options", "ensure_topics", "start_with_retry", "topic_name"]

log = logging.getLogger(__name__)


#: Every stream of the log: a topic each.
STREAMS = tuple(Stream)
#: Start-up: pause between attempts to reach the brokers.
CONNECT_RETRY_S = 1.0
#: How long KafkaConsumer.end_offsets waits for its probe fetches' answers.
END_PROBE_TIMEOUT_S = 10.0


def topic_name(k: KafkaConfig, stream: str) -> str:
    return f"{k.topic_prefix}{stream}"


def client_options(k: KafkaConfig) -> dict[str, Any]:
    """The connection options every aiokafka client of ``k`` takes (servers, security)."""
    sec = k.security
    opts: dict[str, Any] = {
        "bootstrap_servers": list(k.bootstrap_servers),
        "security_protocol": sec.protocol,
    }
    if sec.protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile
        )
        opts["ssl_context"] = context
    if sec.sasl_mechanism is not None:
        opts["sasl_mechanism"] = sec.sasl_mechanism
        opts["sasl_plain_username"] = sec.sasl_username
        opts["sasl_plain_password"] = sec.sasl_password
    return opts


async def start_with_retry(client: Any, k: KafkaConfig, what: str) -> None:
    """``client.start()``, tried again until kafka.connect_timeout_s (brokers still starting)."""
    deadline = time.monotonic() + k.connect_timeout_s
    while True:
        try:
            await client.start()
            return
        except KafkaError as exc:
            if time.monotonic() >= deadline:
                raise LogUnavailable(
                    f"kafka: {what} cannot reach {', '.join(k.bootstrap_servers)}: {exc}"
                ) from None
            log.warning("kafka: %s cannot reach the brokers yet (%s); trying again", what, exc)
            await asyncio.sleep(CONNECT_RETRY_S)


async def ensure_topics(
    k: KafkaConfig, partitions: Mapping[str, int], retention_ms: int | None = None
) -> None:
    """Create the topics of ``partitions`` (stream -> count) that do not exist yet."""
    admin = AIOKafkaAdminClient(**client_options(k))
    await start_with_retry(admin, k, "the admin client")
    try:
        existing = set(await admin.list_topics())
        configs = {} if retention_ms is None else {"retention.ms": str(retention_ms)}
        missing = [
            NewTopic(topic_name(k, stream), count, k.replication_factor, topic_configs=configs)
            for stream, count in partitions.items()
            if topic_name(k, stream) not in existing
        ]
        if not missing:
            return
        try:
            await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass  # another pod created them meanwhile
        log.info("kafka: created topics %s", ", ".join(t.name for t in missing))
    finally:
        await admin.close()


