"""The edge's CPU per request in one process, without sockets or a load generator.

Drives ``HttpProtocol`` through fake transports (``--connections`` of them, one
request in flight each, closed loop) over a real ``Ingest`` and a real
``EmbeddedLog`` in a temporary data dir, and prints the process's CPU per
request. With no kernel networking and no client in the measurement, it tells
apart changes too small for the noise of a shared machine; under
``valgrind --tool=callgrind`` the instruction count per request (the difference
of two runs of different ``--requests``) is exact to a few parts in 10,000.

``--mode`` peels the layers: ``canned`` answers every POST with a fixed reply
(the HTTP layer alone), ``nolog`` runs the ingest over a log that is durable at
once, ``full`` (the default) is the real path.

    python -m bench.inproc --batch 1 --connections 256 --requests 60000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence

import msgspec
import uvloop

from bench.seedload import STAMP, request_templates
from evd.bench.http import Target
from evd.config import load_config
from evd.core.log import Append, Producer
from evd.edge.http import HttpProtocol
from evd.edge.ingest import Ingest, Pending, Reply
from evd.edge.server import Server
from evd.worker import open_log

CANNED = Reply(200, b'{"accepted":1,"duplicates":0,"rejected":[]}')


class _Transport(asyncio.Transport):
    """Hands every response straight to its client."""

    def __init__(self, client: _Client) -> None:
        super().__init__()
        self.client = client
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.client.answered(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class _Run:
    """Requests sent and answered over all clients; done once ``total`` are answered."""

    def __init__(self, total: int, templates: list[bytes], batch: int) -> None:
        self.total = total
        self.templates = templates
        self.batch = batch
        self.sent = 0
        self.answered = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _Client:
    """One connection: sends its next request as soon as the last is answered."""

    def __init__(self, proto: HttpProtocol, run: _Run) -> None:
        self.proto = proto
        self.run = run
        proto.connection_made(_Transport(self))

    def send(self) -> None:
        run = self.run
        if run.sent >= run.total:
            return
        run.sent += 1
        template = run.templates[run.sent % len(run.templates)]
        self.proto.data_received(template.replace(STAMP, b"%018d" % run.sent, run.batch))

    def answered(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected response: {data[:200]!r}")
        run = self.run
        run.answered += 1
        if run.answered >= run.total:
            if not run.done.done():
                run.done.set_result(None)
            return
        self.send()


class _DurableAtOnce(Producer):
    """A log whose appends of one loop pass share a commit that ends on the next pass."""

    writable = True
    overloaded = False
    pending_bytes = 0

    def __init__(self) -> None:
        self._commit: asyncio.Future[None] | None = None

    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        raise NotImplementedError("ingest appends with append_all")

    async def flush(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        commit = self._commit
        if commit is None or commit.done():
            loop = asyncio.get_running_loop()
            commit = self._commit = loop.create_future()
            loop.call_soon(commit.set_result, None)
        return commit


async def measure(args: argparse.Namespace) -> tuple[float, float, float]:
    """(user µs, system µs) of CPU per request, and requests per second."""
    data_dir = tempfile.mkdtemp(prefix="evd-inproc-")
    cfg = load_config(None)  # EVD_SECTION__KEY overrides apply
    cfg = msgspec.structs.replace(
        cfg,
        server=msgspec.structs.replace(cfg.server, data_dir=data_dir),
        log=msgspec.structs.replace(cfg.log, fsync=args.fsync),
    )
    log = open_log(cfg)
    try:
        ingest = Ingest(cfg, _DurableAtOnce() if args.mode == "nolog" else log)
        if args.mode == "canned":
            def canned(body: bytes, encoding: bytes | None, key: bytes) -> Reply | Pending:
                return CANNED
            ingest.handle = canned  # type: ignore[method-assign]
        server = Server(cfg, log, ingest)
        target = Target.parse("http://127.0.0.1:8080")
        run = _Run(args.requests, request_templates(args.batch, "evd-dev-key", target, 1), args.batch)
        clients = [_Client(HttpProtocol(cfg.limits, server), run) for _ in range(args.connections)]
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        for client in clients:
            client.send()
        await run.done
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    n = args.requests
    return (
        (after.ru_utime - before.ru_utime) / n * 1e6,
        (after.ru_stime - before.ru_stime) / n * 1e6,
        n / elapsed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="events per request")
    parser.add_argument("--connections", type=int, default=256, help="requests in flight")
    parser.add_argument("--requests", type=int, default=20_000, help="requests per run")
    parser.add_argument("--runs", type=int, default=1, help="runs; each is printed")
    parser.add_argument("--fsync", choices=["always", "interval", "never"], default="always")
    parser.add_argument("--mode", choices=["full", "nolog", "canned"], default="full")
    args = parser.parse_args(argv)
    for _ in range(args.runs):
        user, system, rate = uvloop.run(measure(args))
        print(
            f"batch {args.batch} mode {args.mode} fsync {args.fsync}: CPU per request"
            f" user {user:.1f} µs + system {system:.1f} µs = {user + system:.1f} µs;"
            f" {rate:,.0f} requests/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
