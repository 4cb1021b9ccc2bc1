"""Edge pieces without sockets: bounded gunzip, keys, rate limits, the recent-id
window, and Ingest against an in-memory log (fast path and per-event path agree)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import tracemalloc
import zlib
from typing import Any, cast

import msgspec
import pytest
from evdtest import MemoryLog, batch, make_event
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from strategies import error_of, events

from evd.config import load_config
from evd.core.config import AuthConfig, LimitsConfig
from evd.core.errors import LogOverloaded, LogUnavailable
from evd.core.log import records
from evd.core.log.streams import Stream
from evd.edge.auth import KeyRing, RateLimiter
from evd.edge.ingest import Ingest, Pending, RecentIds, Reply, TooLarge, gunzip

HYPOTHESIS_SEED = int(os.environ.get("EVD_TEST_SEED") or 20240503)


# -- gunzip --------------------------------------------------------------------------------


def test_gunzip_inflates_up_to_the_limit() -> None:
    data = os.urandom(1000) * 10
    assert gunzip(gzip.compress(data), len(data)) == data
    with pytest.raises(TooLarge):
        gunzip(gzip.compress(data), len(data) - 1)


def test_gunzip_rejects_truncated_and_corrupt_input() -> None:
    good = gzip.compress(b'{"events": []}' * 50)
    for bad in (good[:-4], good[: len(good) // 2], b"plain text", b""):
        with pytest.raises(zlib.error):
            gunzip(bad, 1 << 20)


def test_gunzip_of_a_bomb_stops_at_the_limit_without_inflating_it() -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(deflater.compress(bytes(1 << 20)) for _ in range(64)) + deflater.flush()
    limit = 256 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge):
            gunzip(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflating it all would take 64 MiB; a bounded inflate holds about the limit.
    assert peak < 8 * limit, peak


# -- keys and rate limits ------------------------------------------------------------------


def test_key_ring_plain_and_sha256_keys() -> None:
    digest = hashlib.sha256(b"secret").hexdigest()
    ring = KeyRing(AuthConfig(keys=["plain-key", f"sha256:{digest}"]))
    assert ring.check(b"Bearer plain-key") == b"plain-key"
    assert ring.check(b"bearer secret") == b"secret"
    assert ring.check(b"Bearer  secret ") == b"secret"
    for bad in (None, b"", b"Bearer", b"Bearer wrong", b"plain-key", b"Bearer " + digest.encode(),
                b"Bearer sha256:" + digest.encode(), b"Token plain-key"):
        assert ring.check(bad) is None, bad


def test_key_ring_disabled_lets_everyone_in() -> None:
    ring = KeyRing(AuthConfig(enabled=False, keys=[]))
    assert ring.check(None) == b""


def test_rate_limiter_token_bucket() -> None:
    limiter = RateLimiter(LimitsConfig(rate_limit_events_per_s=10, rate_limit_burst=20))
    assert limiter.take(b"k", 20) == 0.0
    wait = limiter.take(b"k", 5)
    assert wait >= 1.0 and wait == int(wait)
    assert limiter.take(b"other", 20) == 0.0  # buckets are per key
    # A batch larger than the bucket passes when the bucket is full, never otherwise.
    big = RateLimiter(LimitsConfig(rate_limit_events_per_s=1, rate_limit_burst=3))
    assert big.take(b"k", 10) == 0.0
    assert big.take(b"k", 10) > 0
    assert RateLimiter(LimitsConfig()).take(b"k", 10**9) == 0.0  # 0 disables


def test_recent_ids_keeps_at_least_half_its_capacity() -> None:
    recent = RecentIds(10)
    recent.add_all([f"a{i}" for i in range(4)])
    assert all(f"a{i}" in recent for i in range(4))
    recent.add_all([f"b{i}" for i in range(5)])  # the current generation fills and rotates
    recent.add_all([f"c{i}" for i in range(5)])
    assert all(f"c{i}" in recent for i in range(5))
    assert recent.seen_among({"c0", "c4", "zzz"}) == {"c0", "c4"}
    assert recent.seen_among({"zzz"}) == set()
    recent.add_all([f"d{i}" for i in range(5)])
    assert "a0" not in recent  # bounded: old generations are forgotten


# -- Ingest against an in-memory log --------------------------------------------------------


def make_ingest(log: MemoryLog, **limits: Any) -> Ingest:
    cfg = load_config(None, environ={})
    cfg = msgspec.structs.replace(
        cfg, log=msgspec.structs.replace(cfg.log, partitions=log.partitions)
    )
    if limits:
        cfg = msgspec.structs.replace(cfg, limits=msgspec.structs.replace(cfg.limits, **limits))
    return Ingest(cfg, log)


async def settle(result: Reply | Pending, ingest: Ingest) -> dict[str, Any]:
    """The response body once the appends are durable (as the HTTP layer does it)."""
    if isinstance(result, Pending):
        await result.durable
        ingest.committed(result)
        result = result.reply
    assert result.status == 200, result
    return cast(dict[str, Any], json.loads(result.body))


async def test_events_are_partitioned_by_user() -> None:
    log = MemoryLog(partitions=4)
    ingest = make_ingest(log)
    events = [make_event(f"part-{i}", user_id=f"user-{i % 7}") for i in range(40)]
    body = await settle(ingest.handle(batch(events), None, b"k"), ingest)
    assert body["accepted"] == 40
    for stream, partition, payload in log.appends:
        assert stream == Stream.RAW
        for event in records.decode(payload, Stream.RAW).events:
            assert partition == zlib.crc32(event.user_id.encode()) % 4
    # One record per partition per request, not one per event.
    assert len(log.appends) == len({zlib.crc32(f"user-{i}".encode()) % 4 for i in range(7)})


async def test_committed_ids_are_duplicates_in_later_requests() -> None:
    log = MemoryLog()
    ingest = make_ingest(log)
    x1, x2 = make_event("x1"), make_event("x2")
    first = await settle(ingest.handle(batch([x1, x1]), None, b"k"), ingest)
    assert (first["accepted"], first["duplicates"]) == (1, 1)
    again = await settle(ingest.handle(batch([x1, x2]), None, b"k"), ingest)
    assert (again["accepted"], again["duplicates"]) == (1, 1)
    assert sorted(log.raw_ids()) == ["x1", "x2"]


@pytest.mark.parametrize(
    "error, status, retry_after",
    [(LogOverloaded("full"), 503, 1), (LogUnavailable("read-only"), 503, 5)],
)
async def test_log_refusing_the_append_is_503_with_retry_after(
    error: BaseException, status: int, retry_after: int
) -> None:
    ingest = make_ingest(MemoryLog(fail=error))
    reply = ingest.handle(batch([make_event("refused")]), None, b"k")
    assert isinstance(reply, Reply)
    assert (reply.status, reply.retry_after) == (status, retry_after)


async def _ingest_agrees(raws: list[Any]) -> None:
    log = MemoryLog()
    ingest = make_ingest(log)
    body = await settle(ingest.handle(batch(raws), None, b"k"), ingest)
    # The reference: every event on its own through the schema.
    invalid = [i for i, raw in enumerate(raws) if error_of(raw) is not None]
    assert [r["index"] for r in body["rejected"]] == invalid
    for r in body["rejected"]:
        assert r["error"] == error_of(raws[r["index"]])
    valid_ids = [raw["event_id"] for i, raw in enumerate(raws) if i not in invalid]
    assert body["accepted"] == len(set(valid_ids))
    assert body["duplicates"] == len(valid_ids) - len(set(valid_ids))
    assert sorted(log.raw_ids()) == sorted(set(valid_ids))
    assert log.dead_indices() == invalid


@seed(HYPOTHESIS_SEED)
@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(events(), min_size=1, max_size=10))
def test_ingest_accepts_exactly_the_events_the_schema_accepts(raws: list[Any]) -> None:
    print(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    asyncio.run(_ingest_agrees(raws))


def test_gunzip_reads_every_member_of_a_multi_member_stream() -> None:
    body = gzip.compress(b'{"events": [') + gzip.compress(b"]}")
    assert gunzip(body, 1 << 20) == b'{"events": []}'
    with pytest.raises(TooLarge):  # the limit counts all members together
        gunzip(gzip.compress(b"a" * 10) + gzip.compress(b"b" * 10), 15)


def test_retry_after_for_a_batch_bigger_than_the_bucket_waits_for_a_full_bucket() -> None:
    limiter = RateLimiter(LimitsConfig(rate_limit_events_per_s=10, rate_limit_burst=20))
    assert limiter.take(b"k", 20) == 0.0
    # 1000 events pass once the bucket is full again: 20 tokens at 10/s is 2 s, not 100 s.
    assert limiter.take(b"k", 1000) == 2.0
