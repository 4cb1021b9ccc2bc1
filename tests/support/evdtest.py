"""Helpers shared by the test modules: a real ``evd serve`` process, HTTP clients
(http.client for plain requests, a raw socket for pipelining and slow clients),
and event builders.

Every helper talks to 127.0.0.1 only and bounds its waits in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import os
import re
import signal
import socket
import string
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple, Self

from evd.core.log import Append, Producer, records
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.streams import Stream
from evd.sinks.base import SinkContext

DEV_KEY = "evd-dev-key"
HOST = "127.0.0.1"
SEED_EVENT_PATH = Path(__file__).parents[1] / "data" / "seed-event.json"
LISTENING_RE = re.compile(r"evd listening on http://127\.0\.0\.1:(\d+)")
WORKER_RE = re.compile(r"evd listening on http://\S+ \(worker (\d+) of \d+, pid (\d+)")
#: Workers of every server a test starts without choosing (EVD_TEST_WORKERS=2 runs
#: the suite against two workers per server).
TEST_WORKERS = int(os.environ.get("EVD_TEST_WORKERS") or 1)
#: Generous bounds for a noisy 2-core machine; a healthy run takes a fraction.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

_BASE62 = string.ascii_letters + string.digits


# -- events ---------------------------------------------------------------------


def track_id(n: int) -> str:
    """A valid track URI derived from ``n`` (22 base62 characters)."""
    chars = []
    for _ in range(22):
        n, r = divmod(n, 62)
        chars.append(_BASE62[r])
    return "spotify:track:" + "".join(chars)


def make_event(event_id: str, user_id: str = "user-1", **fields: Any) -> dict[str, Any]:
    """A valid play event; ``fields`` replace top-level fields (None removes one)."""
    event: dict[str, Any] = {
        "event_id": event_id,
        "event_type": "play",
        "timestamp": "2024-05-01T12:00:00.000Z",
        "user_id": user_id,
        "track_id": track_id(zlib.crc32(event_id.encode())),
        "playback": {"position_ms": 0, "duration_ms": 200_000, "initiator": "user_click"},
        "device": {"os": "Android 14", "client_version": "8.9.0"},
        "geo": {"country": "SE", "region": "AB"},
    }
    for key, value in fields.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def iso(ms: int) -> str:
    """Epoch ms as an event timestamp (RFC 3339, UTC, milliseconds)."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def timestamp_ms(event: dict[str, Any]) -> int:
    """The epoch ms of an event's ``timestamp``."""
    return int(datetime.fromisoformat(event["timestamp"]).timestamp() * 1000)


def batch(events: Iterable[Any], **envelope: Any) -> bytes:
    """A request body ``{"events": [...], **envelope}``."""
    return json.dumps({**envelope, "events": list(events)}).encode()


def seed_bytes() -> bytes:
    """The seed event exactly as the file holds it."""
    return SEED_EVENT_PATH.read_bytes()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6)


# -- an in-memory log --------------------------------------------------------------


class MemoryLog(Producer):
    """A Producer in memory: appends complete (durable) at once, in ``appends``."""

    def __init__(self, partitions: int = 4, fail: BaseException | None = None) -> None:
        self.partitions = partitions
        self.fail = fail
        self.appends: list[tuple[str, int, bytes]] = []
        self.is_writable = True
        self.is_overloaded = False

    @property
    def writable(self) -> bool:
        return self.is_writable

    @property
    def overloaded(self) -> bool:
        return self.is_overloaded

    @property
    def pending_bytes(self) -> int:
        return 0  # durable at once

    def append_all(
        self, records: Sequence[Append], *, internal: bool = False
    ) -> asyncio.Future[None]:
        if self.fail is not None:
            raise self.fail
        self.appends.extend(records)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def append(
        self, stream: str, partition: int, payload: bytes, *, internal: bool = False
    ) -> asyncio.Future[int]:
        offset = sum(1 for s, p, _ in self.appends if (s, p) == (stream, partition))
        self.append_all([(stream, partition, payload)], internal=internal)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.set_result(offset)
        return fut

    async def flush(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.is_writable = False

    def raw_ids(self) -> list[str]:
        return [e.event_id for s, _, p in self.appends if s == Stream.RAW
                for e in records.decode(p, Stream.RAW).events]

    def dead_indices(self) -> list[int]:
        return sorted(records.decode(p, Stream.DEAD_LETTER).index
                      for s, _, p in self.appends if s == Stream.DEAD_LETTER)


# -- HTTP -------------------------------------------------------------------------


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection, closed afterwards."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def post(
    port: int,
    body: bytes,
    *,
    key: str | None = DEV_KEY,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """POST /v1/events with the dev key and a JSON content type unless told otherwise."""
    h: dict[str, str] = {}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    if content_type is not None:
        h["Content-Type"] = content_type
    h.update(headers or {})
    return request(port, "POST", "/v1/events", body, h, timeout)


def raw_post(body: bytes, *, key: str = DEV_KEY, extra: str = "", close: bool = False) -> bytes:
    """The bytes of a POST /v1/events request, for raw sockets."""
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


def raw_get(path: str, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


class RawConn:
    """A client socket that parses HTTP/1.1 responses itself (pipelining, slow clients)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def read_response(self, after_head: bool = False) -> Response:
        """The next response (Content-Length framed, as evd always sends; none after HEAD)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = 0 if after_head else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(status, headers, body)

    def wait_closed(self, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` s for the server to close; what it sent, or None if open."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except ConnectionResetError:
                return self.buf
            if not chunk:
                return self.buf
            self.buf += chunk


def parse_responses(data: bytes) -> list[Response]:
    """Every complete response in ``data`` (Content-Length framed, as evd always sends)."""
    out: list[Response] = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        out.append(Response(int(lines[0].split(" ", 2)[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def parse_response(data: bytes) -> Response:
    responses = parse_responses(data)
    if len(responses) != 1:
        raise asyncio.IncompleteReadError(data, None)
    return responses[0]


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a client stream; a peer that died (kill -9) may reset it first."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> Response:
    """Send one request with ``Connection: close`` and read the response to EOF."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(data)
        await writer.drain()
        return parse_response(await asyncio.wait_for(reader.read(), timeout))
    finally:
        await close_writer(writer)


def closed_or_408(sent: bytes | None) -> bool:
    """A slow client's connection ended: closed, with or without a 408 first."""
    return sent is not None and (sent == b"" or sent.startswith(b"HTTP/1.1 408"))


# -- the server process ----------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without EVD_* overrides from the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class EvdServer:
    """A running ``python -m evd serve`` process."""

    def __init__(
        self, proc: subprocess.Popen[bytes], data_dir: Path, log_path: Path, log_file: IO[bytes]
    ) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.log_path = log_path
        self._log_file = log_file
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = LISTENING_RE.search(self.log_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"evd exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        raise TimeoutError(f"evd did not log 'evd listening' in {timeout}s:\n{self.log_text()}")

    def worker_pids(self) -> dict[int, int]:
        """The pid of each worker, the latest started (from their "evd listening" lines)."""
        return {int(k): int(pid) for k, pid in WORKER_RE.findall(self.log_text())}

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if request(self.port, "GET", "/readyz", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"/readyz not 200 within {timeout}s:\n{self.log_text()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout``. The exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.proc.wait(STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.stop()
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self._log_file.close()


class ServerFactory:
    """Starts evd processes and stops every one of them at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[EvdServer] = []
        self._n = 0

    def start(
        self,
        config: dict[str, Any] | None = None,
        *,
        data_dir: Path | None = None,
        port: int | None = 0,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        ready: bool = True,
        launcher: Sequence[str] = (sys.executable, "-m", "evd"),
    ) -> EvdServer:
        """Start ``python -m evd serve`` and wait until it listens (and /readyz is 200).

        ``launcher`` replaces ``python -m evd`` (tests/support/powercut.py records fsyncs).
        """
        self._n += 1
        work = self.tmp / f"server{self._n}"
        work.mkdir(parents=True)
        data_dir = data_dir or work / "data"
        argv = [*launcher, "serve", "--host", HOST, "--data-dir", str(data_dir)]
        if port is not None:
            argv += ["--port", str(port)]
        if config is not None:
            cfg_path = work / "evd.yaml"
            cfg_path.write_text(json.dumps(config))  # JSON is YAML
            argv += ["--config", str(cfg_path)]
        argv += list(args)
        if "--workers" not in argv:
            argv += ["--workers", str(TEST_WORKERS)]
        log_path = work / "evd.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by EvdServer.cleanup
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=clean_env(**(env or {})),
            )
        except BaseException:
            log_file.close()
            raise
        server = EvdServer(proc, data_dir, log_path, log_file)
        self.servers.append(server)
        server.wait_listening()
        if ready:
            server.wait_ready()
        return server

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m evd ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "evd", *args], check=False, capture_output=True, text=True,
        env=clean_env(**(env or {})), timeout=timeout, stdin=subprocess.DEVNULL,
    )


def gone(pid: int) -> bool:
    """The process no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def sink_context(
    data_dir: Path, worker: int, workers: int, partitions: int, chart_window_ms: int,
    **kwargs: Any,
) -> SinkContext:
    """A SinkContext whose consumers read the embedded log under ``data_dir``."""
    kwargs.setdefault("open_consumer", lambda name: EmbeddedConsumer(data_dir, name))
    return SinkContext(data_dir, worker, workers, partitions, chart_window_ms, **kwargs)


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid``, and return once every thread of it has stopped.

    kill() returns before the stop has taken effect: a thread that is running, or
    waiting for a CPU on a busy machine, may still answer a request sent right after.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                stat = Path(task.path, "stat").read_text()
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
            states.append(stat.rpartition(")")[2].split()[0])
        if all(state in "TtZX" for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} not stopped after {timeout} s: {states}"
        time.sleep(0.005)
