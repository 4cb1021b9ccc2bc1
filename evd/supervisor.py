"""``evd serve``: a supervisor and its worker processes.

The supervisor prepares the data directory (the log's layout, the sub-logs of
writers that no longer run), creates the run directory the workers share
(evd.core.host), then starts ``server.workers`` worker processes. Each worker
binds the same port with SO_REUSEPORT, so the kernel spreads connections over
them, and runs its own event loop, edge and log writer; no event data ever
passes through the supervisor.

A worker that dies is started again after a back-off that doubles with each
death in a row; if workers keep dying (MAX_DEATHS within DEATH_WINDOW_S), or
one cannot start at all (exit status 2: bad configuration or data directory),
the supervisor stops the others and exits non-zero, saying why. SIGTERM or
SIGINT is forwarded to every worker, which drains as a single worker does; the
supervisor exits 0 once all have exited 0. A second signal kills the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

import msgspec

from evd.config import Config
from evd.core.errors import EvdError
from evd.core.host import HostState, run_dir
from evd.worker import START_FAILED, prepare_data_dir, run_worker

log = logging.getLogger(__name__)

#: Deaths of workers within DEATH_WINDOW_S after which the supervisor gives up:
#: a worker that keeps crashing must not be restarted forever.
MAX_DEATHS = 5
DEATH_WINDOW_S = 30.0
#: Back-off before restarting a worker: doubles with each death in a row.
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
#: How often the supervisor looks at its workers and the clock.
TICK_S = 0.2
#: Beyond the drain's own bounds, how long workers get to exit after SIGTERM.
EXIT_MARGIN_S = 10.0


def worker_count(setting: int | str) -> int:
    """``server.workers``: a number, or ``auto``: the CPUs this process may run on."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(setting)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket on ``host``:``port`` (0 picks one).

    It holds the port for the workers (and their replacements) to bind beside
    it; being bound without listening, it receives no connections.
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Slot:
    """One worker's place: its process, its deaths, when it may start again."""

    index: int
    process: BaseProcess | None = None
    deaths: deque[float] = field(default_factory=deque)
    in_a_row: int = 0
    start_at: float = 0.0
    started: float = 0.0


class Supervisor:
    """Starts, watches and stops the workers of one server."""

    def __init__(self, cfg: Config, workers: int, log_level: int) -> None:
        self.cfg = cfg
        self.workers = workers
        self.log_level = log_level
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [_Slot(k) for k in range(workers)]
        self.signals = 0
        self.stop_deadline = 0.0
        #: Why the supervisor gave up, and the exit status that says so.
        self.failure: str | None = None
        self.failure_status = 1
        #: A worker exited non-zero while stopping.
        self.unclean = False

    def run(self) -> int:
        cfg = self.cfg
        run = run_dir(cfg.server.data_dir)
        shutil.rmtree(run, ignore_errors=True)
        self.host = HostState.create(run, self.workers)
        reserved = reserve_port(cfg.server.host, cfg.server.port)
        port = reserved.getsockname()[1]
        self.cfg = msgspec.structs.replace(
            cfg, server=msgspec.structs.replace(cfg.server, port=port, workers=self.workers)
        )
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("evd supervisor: starting %d workers on port %d", self.workers, port)
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            reserved.close()
            self.host.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _loop(self) -> int:
        forwarded = 0
        while True:
            now = time.monotonic()
            if self.signals > forwarded:
                forwarded = self.signals
                if forwarded == 1:
                    log.info("evd supervisor: stopping: draining %d workers", self.workers)
                    self._terminate_all()
                    server = self.cfg.server
                    self.stop_deadline = now + server.drain_grace_s + server.drain_timeout_s + EXIT_MARGIN_S
                else:
                    log.warning("evd supervisor: second signal: killing the workers")
                    self._kill_all()
                    return 1
            stopping = forwarded > 0 or self.failure is not None
            for slot in self.slots:
                proc = slot.process
                if proc is not None and not proc.is_alive():
                    self._exited(slot, now, stopping)
                    stopping = stopping or self.failure is not None
                elif proc is None and not stopping and now >= slot.start_at:
                    self._start(slot, now)
            if stopping:
                if all(s.process is None for s in self.slots):
                    if self.failure is not None:
                        log.error("evd supervisor: %s", self.failure)
                        return self.failure_status
                    return 1 if self.unclean else 0
                if self.stop_deadline and now > self.stop_deadline:
                    log.error("evd supervisor: workers did not exit in time: killing them")
                    self._kill_all()
                    return 1
            sentinels = [s.process.sentinel for s in self.slots if s.process is not None]
            multiprocessing.connection.wait(sentinels, timeout=TICK_S)

    def _start(self, slot: _Slot, now: float) -> None:
        proc = self.ctx.Process(
            target=run_worker,
            args=(self.cfg, slot.index, self.log_level),
            name=f"evd-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        slot.process = proc
        slot.started = now

    def _exited(self, slot: _Slot, now: float, stopping: bool) -> None:
        proc = slot.process
        assert proc is not None
        proc.join()
        code = proc.exitcode
        slot.process = None
        self.host.set_up(slot.index, False)
        if stopping:
            if code != 0 and self.failure is None:
                self.unclean = True
                log.warning("evd supervisor: worker %d exited with status %s", slot.index, code)
            return
        log.error("evd supervisor: worker %d (pid %s) exited with status %s", slot.index, proc.pid, code)
        if code == START_FAILED:
            self._give_up(f"worker {slot.index} cannot start; see its error above", START_FAILED)
            return
        slot.deaths.append(now)
        while slot.deaths and slot.deaths[0] < now - DEATH_WINDOW_S:
            slot.deaths.popleft()
        deaths = sum(len(s.deaths) for s in self.slots)
        if deaths >= MAX_DEATHS:
            self._give_up(
                f"workers died {deaths} times within {DEATH_WINDOW_S:g} s"
                f" (last: worker {slot.index}, exit status {code}); giving up"
            )
            return
        # Back-off doubles with each death in a row; a worker that ran a while resets it.
        slot.in_a_row = slot.in_a_row + 1 if now - slot.started < DEATH_WINDOW_S else 1
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (slot.in_a_row - 1))
        slot.start_at = now + backoff
        self.host.add_restart(slot.index)
        log.warning("evd supervisor: restarting worker %d in %.1f s", slot.index, backoff)

    def _give_up(self, why: str, status: int = 1) -> None:
        self.failure = why
        self.failure_status = status
        self._terminate_all()
        self.stop_deadline = time.monotonic() + self.cfg.server.drain_timeout_s + EXIT_MARGIN_S

    def _terminate_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    os.kill(slot.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        for slot in self.slots:
            proc = slot.process
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(5)
            slot.process = None


def run(cfg: Config, log_level: int = logging.INFO) -> int:
    """Run the configured workers until SIGTERM; returns the exit status."""
    workers = worker_count(cfg.server.workers)
    try:
        prepare_data_dir(cfg, workers)
    except EvdError as exc:
        log.error("evd cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("evd cannot start: data_dir %s: %s", cfg.server.data_dir, exc)
        return 2
    try:
        return Supervisor(cfg, workers, log_level).run()
    except OSError as exc:
        log.error("evd cannot start: %s", exc)
        return 2
