"""A lean closed-loop load of seed-shaped batches, for one-core throughput on a small machine.

The full harness (``evd bench``) models realistic sessions, and building those
bodies costs the generator more CPU than the server spends on them: on a 2-core
machine it cannot load one server core. This script pre-builds a few bodies from
the seed event (random users, so a batch spreads over the partitions) and only
stamps a fresh id prefix into each request, so every event id is unique and the
server does its full work. Each connection sends its next request as soon as the
previous one is answered; the script prints events/s, requests/s, p50/p99 and the
statuses seen.

    python -m bench.seedload --batch 100 --connections 32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import NamedTuple

import uvloop

from evd.bench.histogram import Histogram
from evd.bench.http import Connection, Target

#: The seed event: package data of ``evd.bench``, a copy of tests/data/seed-event.json.
SEED = resources.files("evd.bench") / "data" / "seed-event.json"
#: Placeholder for the per-request id prefix, as long as the prefix it becomes:
#: a random run id (8 hex digits) and the request's number (10 digits).
STAMP = b"@" * 18
#: Distinct bodies to choose from (users and order vary between them).
BODIES = 64


def seed_event() -> dict[str, object]:
    """The seed play event (``evd/bench/data/seed-event.json``)."""
    event: dict[str, object] = json.loads(SEED.read_text())
    return event


def batch_body(n: int, tag: str, user_of: Callable[[int], str]) -> bytes:
    """A POST body of ``n`` seed events with ids ``{tag}-{i}`` and users ``user_of(i)``."""
    seed = seed_event()
    events = []
    for i in range(n):
        event = dict(seed)
        event["event_id"] = f"{tag}-{i}"
        event["user_id"] = user_of(i)
        events.append(event)
    return json.dumps({"events": events}).encode()


def request_templates(
    batch: int, key: str, target: Target, seed: int, one_user: bool = False
) -> list[bytes]:
    """Whole HTTP requests whose event ids all start with ``STAMP``: each event's user
    drawn from 100,000, or with ``one_user`` one user per request (a client app
    batching its own user's events)."""
    rng = random.Random(seed)
    out = []
    for _ in range(BODIES):
        user = f"user-{rng.randrange(100_000)}"

        def user_of(_: int, user: str = user) -> str:
            return user if one_user else f"user-{rng.randrange(100_000)}"

        body = batch_body(batch, STAMP.decode(), user_of)
        head = (
            f"POST {target.prefix}/v1/events HTTP/1.1\r\nHost: {target.host_header()}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


#: The accepted count of a 200 response's body (cheaper than decoding it).
ACCEPTED_RE = re.compile(rb'"accepted":\s*(\d+)')


class Load:
    """Shared state of one closed-loop load: the templates, the id counter, the results.

    Connections send until ``stop``; responses completing inside the window
    [``start``, ``end``) are counted in ``statuses`` and ``hist``, the others in
    ``outside``. With ``count_accepted`` the 200s' accepted events are summed.
    """

    def __init__(
        self, templates: list[bytes], run_id: bytes, seed: int, count_accepted: bool = False
    ) -> None:
        self.templates = templates
        self.run_id = run_id
        self.seed = seed
        self.count_accepted = count_accepted
        self.hist = Histogram()  # microseconds
        self.statuses: Counter[str] = Counter()
        self.outside: Counter[str] = Counter()
        self.accepted = 0
        self.counter = 0
        self.conns: list[ClosedLoop] = []
        self.start = 0.0
        self.end = math.inf
        self.stop = 0.0


class ClosedLoop(Connection):
    """A connection that sends its next request from the callback that completes the last.

    It starts sending once connected, or, with ``autostart=False``, when told to
    (``send``), so that many processes can start together.
    """

    def __init__(self, load: Load, autostart: bool = True) -> None:
        super().__init__()
        self.load = load
        self.autostart = autostart
        self.rng = random.Random(load.seed + len(load.conns))
        self.sent = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.autostart:
            self.send()

    def send(self) -> None:
        load = self.load
        now = time.perf_counter()
        if now >= load.stop or self._transport is None or self.closed:
            self.finish()
            return
        load.counter += 1
        data = self.rng.choice(load.templates).replace(STAMP, load.run_id + b"%010d" % load.counter)
        self.sent = now
        self._transport.write(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        pass  # the base class looks for Retry-After in every header; evd answers 200 here

    def on_message_complete(self) -> None:
        load = self.load
        now = time.perf_counter()
        status = str(self._parser.get_status_code())
        if load.start <= now < load.end:
            load.statuses[status] += 1
            load.hist.record(int((now - self.sent) * 1e6))
            if load.count_accepted and status == "200":
                body = self._body
                m = ACCEPTED_RE.search(body[0] if len(body) == 1 else b"".join(body))
                load.accepted += int(m.group(1)) if m else 0
        else:
            load.outside[status] += 1
        if self._parser.should_keep_alive():
            self.send()
        else:
            self.finish()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.done.done():
            load = self.load
            (load.statuses if time.perf_counter() < load.end else load.outside)[
                "connection_lost"] += 1
            self.done.set_result(None)

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.close()


class Result(NamedTuple):
    events_per_s: int
    requests_per_s: int
    p50_ms: float
    p99_ms: float
    #: Responses by status code, plus "timeout" or "connection_lost".
    statuses: dict[str, int]


async def run(args: argparse.Namespace) -> Result:
    target = Target.parse(args.target)
    templates = request_templates(args.batch, args.api_key, target, args.seed)
    run_id = b"%08x" % random.getrandbits(32)  # ids differ between runs
    load = Load(templates, run_id, args.seed)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    load.stop = start + args.duration  # every response counts, the late ones too
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: ClosedLoop(load), target.host, target.port)
        load.conns.append(conn)
    try:
        # Every connection stops sending at the end; one still waiting then is late.
        await asyncio.wait_for(
            asyncio.gather(*(c.done for c in load.conns)), args.duration + args.timeout
        )
    except TimeoutError:
        load.statuses["timeout"] += sum(not c.done.done() for c in load.conns)
    elapsed = time.perf_counter() - start
    for conn in load.conns:
        conn.close()
    ok = load.statuses.get("200", 0)
    return Result(
        round(ok * args.batch / elapsed),
        round(ok / elapsed),
        load.hist.percentile(50) / 1000,
        load.hist.percentile(99) / 1000,
        dict(load.statuses),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default="evd-dev-key")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = uvloop.run(run(args))
    if args.json:
        print(json.dumps(result._asdict()))
    else:
        print(
            f"events/s {result.events_per_s:,}  requests/s {result.requests_per_s:,}  "
            f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  statuses {result.statuses}"
        )
    return 0 if set(result.statuses) == {"200"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
