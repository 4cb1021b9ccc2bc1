"""The per-key rate limit holds for the whole server, not per worker.

With a run dir the workers' RateLimiters share one bucket per key
(``<run_dir>/ratelimit.bin``); these tests take tokens from real processes
(multiprocessing "spawn", as the supervisor starts workers) at once, and check
the total against the bucket's bound, with the per-process buckets as the
negative control; the last test sends POSTs over many connections to
``evd serve --workers 2``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from pathlib import Path

import pytest
from evdtest import ServerFactory, batch, exchange, make_event, raw_post, request
from prometheus_client.parser import text_string_to_metric_families

from evd.core.config import LimitsConfig
from evd.edge import auth
from evd.edge.auth import RateLimiter, SharedBuckets

KEY = b"key-1"


def limits(rate: float, burst: int = 0) -> LimitsConfig:
    return LimitsConfig(rate_limit_events_per_s=rate, rate_limit_burst=burst)


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(auth.time, "monotonic", c)
    return c


@pytest.fixture(params=["local", "shared"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path / "run" if request.param == "shared" else None


# -- the rule, in one process and shared ---------------------------------------------------


def test_a_full_bucket_covers_the_burst_then_refills_at_the_rate(
    clock: Clock, shared: Path | None
) -> None:
    rl = RateLimiter(limits(10, 20), shared)
    try:
        assert rl.empty(KEY) == 0.0
        assert rl.take(KEY, 15) == 0.0
        assert rl.take(KEY, 5) == 0.0
        assert rl.empty(KEY) == 1.0  # no token left: at least a second
        assert rl.take(KEY, 3) == 1.0
        clock.now += 0.25  # 2.5 tokens
        assert rl.empty(KEY) == 0.0
        assert rl.take(KEY, 3) == 1.0
        assert rl.take(KEY, 2) == 0.0
        clock.now += 100  # full again, never more than the burst
        assert rl.take(KEY, 20) == 0.0
        assert rl.take(KEY, 1) == 1.0
        assert rl.take(b"key-2", 20) == 0.0  # its own bucket
    finally:
        rl.close()


def test_a_batch_bigger_than_the_bucket_passes_when_the_bucket_is_full(
    clock: Clock, shared: Path | None
) -> None:
    rl = RateLimiter(limits(10, 20), shared)
    try:
        assert rl.take(KEY, 50) == 0.0
        # 30 tokens owed: 3.1 s until a token, 5 s until the bucket is full again.
        assert rl.empty(KEY) == 4.0
        assert rl.take(KEY, 50) == 5.0
        clock.now += 5
        assert rl.take(KEY, 50) == 0.0
    finally:
        rl.close()


def test_rate_zero_is_off_and_creates_nothing(tmp_path: Path) -> None:
    rl = RateLimiter(limits(0), tmp_path)
    assert rl.empty(KEY) == 0.0
    assert rl.take(KEY, 10**9) == 0.0
    assert list(tmp_path.iterdir()) == []
    rl.close()


def test_two_limiters_on_one_run_dir_share_the_bucket(clock: Clock, tmp_path: Path) -> None:
    a = RateLimiter(limits(10, 20), tmp_path)
    b = RateLimiter(limits(10, 20), tmp_path)
    try:
        assert a.take(KEY, 20) == 0.0
        assert b.empty(KEY) == 1.0
        assert b.take(KEY, 1) == 1.0
        clock.now += 1
        assert b.take(KEY, 10) == 0.0
        assert a.take(KEY, 1) == 1.0
    finally:
        a.close()
        b.close()


def test_keys_beyond_the_table_are_limited_by_the_process(clock: Clock, tmp_path: Path) -> None:
    a = RateLimiter(limits(10, 20), tmp_path, keys=1)  # a slot for one key, and b""
    b = RateLimiter(limits(10, 20), tmp_path, keys=1)
    try:
        for key in (b"k1", b"k2"):
            assert a.take(key, 20) == 0.0
            assert b.take(key, 1) == 1.0  # shared
        assert a.take(b"k3", 20) == 0.0
        assert b.take(b"k3", 20) == 0.0  # the table is full: each its own
    finally:
        a.close()
        b.close()


def test_a_file_that_is_not_a_rate_limit_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / SharedBuckets.FILE).write_bytes(b"x" * 64)
    with pytest.raises(ValueError, match="not an evd rate limit file"):
        RateLimiter(limits(10, 20), tmp_path)


# -- real processes at once ----------------------------------------------------------------


RATE, BURST, SECONDS = 20.0, 200, 1.0


def hammer(
    run_dir: Path | None, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue[object]
) -> None:
    """Take one token at a time for SECONDS; report (allowed, first take, last take)."""
    rl = RateLimiter(limits(RATE, BURST), run_dir)
    start.wait(30)
    began = time.monotonic()
    allowed = 0
    while (now := time.monotonic()) < began + SECONDS:
        if rl.take(KEY, 1) == 0.0:
            allowed += 1
        rl.empty(KEY)
    rl.close()
    out.put((allowed, began, now))


def allowed_by_processes(run_dir: Path | None, n: int) -> tuple[list[int], float]:
    """Tokens each of ``n`` processes got at once, and the span they took them in."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=hammer, args=(run_dir, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)  # let them import and open the bucket
        start.set()
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    counts = [r[0] for r in results]  # type: ignore[index]
    span = max(r[2] for r in results) - min(r[1] for r in results)  # type: ignore[index]
    return counts, span


def test_processes_sharing_a_run_dir_get_one_bucket_between_them(tmp_path: Path) -> None:
    counts, span = allowed_by_processes(tmp_path / "run", 2)
    bound = BURST + RATE * span
    assert BURST <= sum(counts) <= bound + 1, (counts, span)


def test_negative_control_processes_without_a_run_dir_get_a_bucket_each() -> None:
    counts, span = allowed_by_processes(None, 2)
    assert all(c >= BURST for c in counts), counts
    assert sum(counts) > BURST + RATE * span + 1, (counts, span)


# -- through evd serve --workers 2 ---------------------------------------------------------


SERVER_RATE, SERVER_BURST, BATCH = 10, 100, 5


def worker_metric(port: int, name: str) -> dict[str, float]:
    """A per-worker series of /metrics: worker label -> value."""
    text = request(port, "GET", "/metrics").body.decode()
    return {
        s.labels["worker"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def post_spread(port: int, requests: int) -> list[tuple[int, int, str | None]]:
    """POSTs of BATCH events, each on a fresh connection (so they spread over the
    workers), 16 at a time: (status, events accepted, Retry-After) of each."""
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[int, int, str | None]:
        body = batch(make_event(f"rl-{i}-{j}", user_id=f"u-{i}-{j}") for j in range(BATCH))
        async with limit:
            r = await exchange(port, raw_post(body, close=True))
        accepted = json.loads(r.body)["accepted"] if r.status == 200 else 0
        return r.status, accepted, r.headers.get("retry-after")

    return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(requests))), 60))


def test_the_rate_limit_holds_for_the_server_over_many_connections_and_two_workers(
    servers: ServerFactory,
) -> None:
    limits_ = {"rate_limit_events_per_s": SERVER_RATE, "rate_limit_burst": SERVER_BURST}
    server = servers.start({"limits": limits_}, args=["--workers", "2"])
    began = time.monotonic()
    answers = asyncio.run(post_spread(server.port, 120))
    span = time.monotonic() - began
    accepted = sum(a for _, a, _ in answers)
    # One bucket for the server: the burst and what the rate added meanwhile. A
    # bucket per worker would let up to twice the burst through.
    assert SERVER_BURST <= accepted <= SERVER_BURST + SERVER_RATE * span, (accepted, span)
    assert span < SERVER_BURST / SERVER_RATE / 2, "too slow to tell one bucket from two"
    statuses = {s for s, _, _ in answers}
    assert statuses == {200, 429}, statuses
    assert all(int(ra or 0) >= 1 for s, _, ra in answers if s == 429)
    # The traffic reached both workers' buckets, not only one.
    received = worker_metric(server.port, "evd_worker_events_received_total")
    assert set(received) == {"0", "1"} and all(received.values()), received
