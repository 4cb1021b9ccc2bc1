"""The scaling curve: events/s accepted with 1, 2, 4, 8, 12 ... worker processes.

For every worker count N, every batch size and every fsync policy asked for,
the script starts ``evd serve --workers N`` pinned to N cores (a fresh data
directory, a free port, the config ``log.fsync: <policy>``), waits for every
worker's "evd listening" line and ``/readyz``, and drives it from generator
processes pinned to other cores: the closed loop of ``bench.seedload`` (seed
events with unique ids stamped per request, so the server does its full work),
with connections in proportion to N. All generator processes start sending at
one moment; only responses completed inside the common measurement window (after
a warm-up) count. It records events/s accepted, requests/s, p50/p99, the
statuses, the CPU of the server's process tree and of the generator (from
/proc, over the same window), stops the server (SIGTERM, then waits), and
prints a table per curve with the ratio to the 1-worker figure of the same run
and the 0.8 x linear check; ``--out`` gets scaling.json, scaling.md and the
servers' logs.

    python -m bench.scaling                                   # 1,2,4,8,12 workers, batch 1 and 100
    python -m bench.scaling --workers 1,2 --fsync always --duration 5
    python -m bench.scaling --workers 1,2,4,8,12 --gen-cores 12-15

Cores: the server of N workers gets the first N CPUs of this process's
affinity mask, the generator the CPUs that the largest N leaves free (or
``--gen-cores``). Worker counts that leave no core free run with the generator
on every core (flagged "shared"); counts above the CPUs there are are skipped.
Everything talks to 127.0.0.1 only, every wait is bounded, and what the script
starts is stopped on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
API_KEY = "evd-dev-key"
ROOT = Path(__file__).resolve().parents[1]
#: Workers whose figure must reach 0.8 x linear (issue 9: "up to 8 workers").
LINEAR_UP_TO = 8
LINEAR_FRACTION = 0.8
#: Target at batch 100 with fsync: always, on a 16-core machine.
TARGET_EVENTS_PER_S = 2_000_000
#: Keep-alive connections per worker: single-event POSTs need many in flight to
#: fill a group commit; 100-event batches fewer (bench/onecore.sh uses 256 and 128).
CONNECTIONS_PER_WORKER_SMALL = 256
CONNECTIONS_PER_WORKER_LARGE = 64
SMALL_BATCH = 10
#: Time bounds (seconds).
READY_TIMEOUT_S = 30.0
READY_TIMEOUT_PER_WORKER_S = 3.0
GEN_READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
#: Until a run has been timed, the time a run takes besides warm-up and duration.
OVERHEAD_GUESS_S = 4.0
#: The generator (or the workers) counts as saturated at this share of its cores.
BUSY = 0.85
#: Other processes and the hypervisor taking this many cores' worth flag a run.
NOISY = 0.25

LISTENING_RE = re.compile(r"evd listening on http://127\.0\.0\.1:(\d+)")


# -- core lists and placement ---------------------------------------------------


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` (taskset's syntax) as a sorted list of distinct CPUs."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty item in CPU list {text!r}")
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"not a CPU or a range of CPUs: {part!r}")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"range runs backwards: {part!r}")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def format_cpu_list(cpus: Sequence[int]) -> str:
    """The shortest taskset form of ``cpus``: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,2,4"`` as distinct positive ints in ascending order."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"{what}: expected numbers >= 1, got {text!r}")
    return values


def parse_fsync_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("always", "interval", "never")]
    if not values or bad:
        raise ValueError(f"--fsync: expected always, interval or never, got {text!r}")
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class Placement:
    """Where the server of ``workers`` workers and its load generator run."""

    workers: int
    server_cores: tuple[int, ...]
    gen_cores: tuple[int, ...]

    @property
    def shared(self) -> bool:
        """The generator runs on cores the workers run on too."""
        return bool(set(self.server_cores) & set(self.gen_cores))


def plan_placements(
    workers: Sequence[int], allowed: Sequence[int], gen_cores: Sequence[int] | None = None
) -> tuple[list[Placement], list[str]]:
    """Cores for each worker count, and notes on what did not fit.

    The server of N workers gets the first N allowed CPUs that are not the
    generator's. Without ``gen_cores`` the generator gets the CPUs the largest
    count that leaves one free does not use, the same for every count so the
    ratios are comparable; a count that leaves none free runs with the
    generator on every allowed CPU (shared). Counts above the allowed CPUs are
    skipped.
    """
    cpus = sorted(set(allowed))
    notes: list[str] = []
    fits = [n for n in sorted(set(workers)) if n <= len(cpus)]
    for n in sorted(set(workers)):
        if n > len(cpus):
            notes.append(
                f"{n} workers skipped: they need {n} cores and this process may use "
                f"{len(cpus)} ({format_cpu_list(cpus)})"
            )
    placements: list[Placement] = []
    if gen_cores is not None:
        gen = sorted(set(gen_cores))
        outside = sorted(set(gen) - set(cpus))
        if outside:
            raise ValueError(
                f"--gen-cores {format_cpu_list(outside)} not in this process's CPUs "
                f"({format_cpu_list(cpus)})"
            )
        free = [c for c in cpus if c not in gen]
        for n in fits:
            server = free[:n] if len(free) >= n else cpus[:n]
            placements.append(Placement(n, tuple(server), tuple(gen)))
    else:
        spare = [n for n in fits if n < len(cpus)]
        gen = cpus[max(spare):] if spare else cpus
        for n in fits:
            if n in spare:
                placements.append(Placement(n, tuple(cpus[:n]), tuple(gen)))
            else:
                placements.append(Placement(n, tuple(cpus[:n]), tuple(cpus)))
    shared = [p.workers for p in placements if p.shared]
    if shared:
        notes.append(
            f"{', '.join(map(str, shared))} workers: no core left for the load generator, "
            "which shares the workers' cores (its CPU is taken from theirs: not a clean figure)"
        )
    return placements, notes


def connections_for(batch: int, workers: int, per_worker: int | None = None) -> int:
    """Keep-alive connections in total for ``workers`` workers at ``batch``."""
    if per_worker is None:
        per_worker = (
            CONNECTIONS_PER_WORKER_SMALL if batch < SMALL_BATCH else CONNECTIONS_PER_WORKER_LARGE
        )
    return per_worker * workers


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as integers allow (none empty)."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- CPU time from /proc ------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system, own and of reaped children) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3 of proc(5)); utime, stime, cutime, cstime are 14-17.
    ticks = sum(int(v) for v in fields[11:15])
    return int(fields[1]), ticks / CLK_TCK


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and every process under it, by pid."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][1]
        todo.extend(children.get(pid, ()))
    return out


def pids_cpu(pids: Sequence[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        st = _proc_stat(pid)
        if st is not None:
            out[pid] = st[1]
    return out


def cpus_busy(cpus: Sequence[int]) -> tuple[float, float]:
    """(busy, stolen) CPU seconds so far of ``cpus``, from /proc/stat."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = steal = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in wanted:
                # user nice system idle iowait irq softirq steal ...
                v = [int(x) for x in parts[1:9]]
                busy += v[0] + v[1] + v[2] + v[5] + v[6]
                steal += v[7]
    return busy / CLK_TCK, steal / CLK_TCK


def wait_quiet(cpus: Sequence[int], timeout: float, busy: float = 0.1,
               window: float = 2.0) -> bool:
    """Until ``cpus`` were busy under ``busy`` cores for ``window`` s; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        before = cpus_busy(cpus)[0]
        time.sleep(window)
        if (cpus_busy(cpus)[0] - before) / window < busy:
            return True
        if time.monotonic() + window > deadline:
            return False


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """CPU seconds each process used between two samples (new processes from 0)."""
    return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


# -- child processes ------------------------------------------------------------------


def _child_setup(cpus: Sequence[int], death_signal: int) -> Callable[[], None]:
    """A preexec_fn: pin to ``cpus`` (as taskset -c does), get ``death_signal`` if we die."""

    def setup() -> None:
        os.sched_setaffinity(0, cpus)
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, death_signal)  # PR_SET_PDEATHSIG

    return setup


class ServerProcess:
    """``evd serve --workers N`` pinned to its cores, in a session of its own."""

    def __init__(self, argv: list[str], cores: Sequence[int], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVD_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_child_setup(cores, signal.SIGTERM),  # noqa: PLW1509 (no threads)
        )
        self.port = 0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, workers: int, timeout: float) -> None:
        """Until ``workers`` "evd listening" lines and ``/readyz`` 200, or raise."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            ports = LISTENING_RE.findall(text)
            if len(ports) >= workers:
                self.port = int(ports[0])
                if _get(self.port, "/readyz") == 200:
                    return
            if self.proc.poll() is not None:
                raise RunError(f"evd exited with status {self.proc.returncode}", text)
            if time.monotonic() > deadline:
                raise RunError(
                    f"evd not ready in {timeout:g} s ({len(ports)} of {workers} workers "
                    "listening)", text)
            time.sleep(0.05)

    def stop(self) -> int | None:
        """SIGTERM, wait; SIGKILL the session if it takes too long. The exit status."""
        rc: int | None = None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # Workers left behind (or all of them, after a timeout) go with the session.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            if self.proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
            self._log.close()
        return rc


def _get(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


class RunError(Exception):
    """A run could not be measured; ``log`` is the server's output, if any."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class Generators:
    """The load generator processes of one run (``python -m bench.scaling _generate``)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._out: dict[int, bytes] = {}

    def start(self, specs: list[dict[str, Any]], cores: Sequence[int]) -> None:
        for spec in specs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.scaling", "_generate", json.dumps(spec)],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
                preexec_fn=_child_setup(cores, signal.SIGKILL),  # noqa: PLW1509
            )
            self.procs.append(proc)
            self._out[proc.pid] = b""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_ready(self, timeout: float) -> None:
        """Until every generator printed "ready" (connected), or raise."""
        deadline = time.monotonic() + timeout
        waiting = {p.stdout.fileno(): p for p in self.procs if p.stdout is not None}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"{len(waiting)} generator processes not ready in {timeout:g} s")
            readable, _, _ = select.select(list(waiting), [], [], min(left, 0.5))
            for fd in readable:
                proc = waiting[fd]
                chunk = os.read(fd, 65536)
                self._out[proc.pid] += chunk
                if b"ready\n" in self._out[proc.pid]:
                    del waiting[fd]
                elif not chunk:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RunError(f"a generator process exited before it was ready:\n{err}")

    def go(self, start_epoch: float) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"%r\n" % start_epoch)
            proc.stdin.close()
            proc.stdin = None  # communicate() must not flush it

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """Each generator's result line, or raise."""
        deadline = time.monotonic() + timeout
        out = []
        for proc in self.procs:
            try:
                rest, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RunError(f"a generator process did not finish in {timeout:g} s") from None
            text = (self._out[proc.pid] + rest).decode(errors="replace")
            lines = [ln for ln in text.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RunError(
                    f"a generator process failed (status {proc.returncode}):\n"
                    f"{err.decode(errors='replace')[-2000:]}")
            out.append(json.loads(lines[-1]))
        return out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


# -- the generator (child process) ------------------------------------------------------


def _generator_main(spec: dict[str, Any]) -> int:
    """One generator process: connect, say ready, wait for the start, load, report."""
    import uvloop

    return uvloop.run(_generate(spec))


async def _generate(spec: dict[str, Any]) -> int:
    from bench.seedload import ClosedLoop, Load, request_templates
    from evd.bench.http import Target

    target = Target.parse(spec["target"])
    templates = request_templates(spec["batch"], spec["api_key"], target, spec["seed"])
    # Ids unique across the run's processes: the process's index and random bits.
    run_id = b"%02x%06x" % (spec["index"] % 256, random.getrandbits(24))
    load = Load(templates, run_id, spec["seed"] * 100_003, count_accepted=True)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(spec["connections"]):
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: ClosedLoop(load, autostart=False),
                                       target.host, target.port),
                spec["timeout"])
            load.conns.append(conn)
    except (OSError, TimeoutError) as exc:
        print(f"generator {spec['index']}: cannot connect: {exc!r}", file=sys.stderr)
        return 1
    print("ready", flush=True)
    line = sys.stdin.readline()  # the start time (epoch seconds); nothing runs meanwhile
    if not line.strip():
        return 1
    start_epoch = float(line)
    offset = time.time() - time.perf_counter()
    ready_late_s = max(0.0, time.time() - start_epoch)
    load.start = start_epoch + spec["warmup"] - offset
    load.end = load.stop = start_epoch + spec["warmup"] + spec["duration"] - offset
    await asyncio.sleep(max(0.0, start_epoch - time.time()))
    conns = load.conns
    for conn in conns:
        conn.send()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.done for c in conns)),
            max(0.0, load.end - time.perf_counter()) + spec["timeout"])
    except TimeoutError:
        load.statuses["timeout"] += sum(not c.done.done() for c in conns)
    for conn in conns:
        conn.close()
    print(json.dumps({
        "index": spec["index"],
        "accepted": load.accepted,
        "requests": sum(load.statuses.values()),
        "statuses": dict(load.statuses),
        "outside_window": dict(load.outside),
        "hist": load.hist.to_dict(),
        "late_start_s": round(ready_late_s, 4),
    }), flush=True)
    return 0


# -- one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    fsync: str
    batch: int
    workers: int
    server_cores: str
    gen_cores: str
    shared: bool
    gen_procs: int
    connections: int
    repeat: int = 0
    #: Events accepted by the 200s that completed in the measured window.
    accepted: int = 0
    events_per_s: float = 0.0
    requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    #: Cores' worth of CPU the server's process tree and the generator used in the window.
    server_cpu_cores: float = 0.0
    gen_cpu_cores: float = 0.0
    #: The rest of the busy CPU of the cores in use (other processes, interrupts), and
    #: the CPU the hypervisor took from them: both say how quiet the machine was.
    other_cpu_cores: float = 0.0
    stolen_cpu_cores: float = 0.0
    #: The busiest process first: the supervisor is one, each worker another.
    server_cpu_by_process: list[float] = field(default_factory=list)
    server_exit: int | None = None
    seconds: float = 0.0
    error: str | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class Settings:
    workers: list[int]
    batches: list[int]
    fsync: list[str]
    duration: float
    warmup: float
    repeat: int
    gen_procs: int | None
    connections_per_worker: int | None
    evd: list[str]
    out: Path
    data_root: Path
    time_limit: float
    wait_quiet: float = 0.0


def run_one(s: Settings, place: Placement, batch: int, fsync: str, repeat: int) -> RunResult:
    """Start the server, load it, measure, stop it: one point of one curve."""
    procs = s.gen_procs or len(place.gen_cores)
    conns = connections_for(batch, place.workers, s.connections_per_worker)
    res = RunResult(fsync, batch, place.workers, format_cpu_list(place.server_cores),
                    format_cpu_list(place.gen_cores), place.shared, min(procs, conns), conns,
                    repeat)
    began = time.monotonic()
    data = Path(tempfile.mkdtemp(prefix="evd-scaling-", dir=s.data_root))
    name = f"{fsync}-b{batch}-w{place.workers}" + (f"-r{repeat}" if s.repeat > 1 else "")
    (data / "evd.yaml").write_text(f"log:\n  fsync: {fsync}\n")
    argv = [*s.evd, "serve", "--config", str(data / "evd.yaml"), "--host", HOST, "--port", "0",
            "--data-dir", str(data / "data"), "--workers", str(place.workers)]
    logs = s.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server: ServerProcess | None = None
    gens: Generators | None = None
    try:
        server = ServerProcess(argv, place.server_cores, data, logs / f"{name}.log")
        server.wait_ready(place.workers,
                          READY_TIMEOUT_S + READY_TIMEOUT_PER_WORKER_S * place.workers)
        specs = [{"target": f"http://{HOST}:{server.port}", "api_key": API_KEY,
                  "batch": batch, "connections": c, "seed": 1 + i, "index": i,
                  "warmup": s.warmup, "duration": s.duration, "timeout": REQUEST_TIMEOUT_S}
                 for i, c in enumerate(split(conns, procs))]
        gens = Generators()
        gens.start(specs, place.gen_cores)
        gens.wait_ready(GEN_READY_TIMEOUT_S + conns / 500)
        start = time.time() + 0.2
        gens.go(start)
        used = sorted(set(place.server_cores) | set(place.gen_cores))
        _sleep_until(start + s.warmup)
        s0, g0, m0 = tree_cpu(server.proc.pid), pids_cpu(gens.pids), cpus_busy(used)
        t0 = time.monotonic()
        _sleep_until(start + s.warmup + s.duration)
        s1, g1, m1 = tree_cpu(server.proc.pid), pids_cpu(gens.pids), cpus_busy(used)
        t1 = time.monotonic()
        results = gens.results(REQUEST_TIMEOUT_S + 15.0)
        window = t1 - t0
        by_proc = sorted(cpu_delta(s0, s1).values(), reverse=True)
        res.server_cpu_by_process = [round(v / window, 3) for v in by_proc]
        res.server_cpu_cores = round(sum(by_proc) / window, 3)
        res.gen_cpu_cores = round(sum(cpu_delta(g0, g1).values()) / window, 3)
        res.other_cpu_cores = round(
            max(0.0, (m1[0] - m0[0]) / window - res.server_cpu_cores - res.gen_cpu_cores), 3)
        res.stolen_cpu_cores = round((m1[1] - m0[1]) / window, 3)
        _fill(res, results, s.duration)
        late = max(r["late_start_s"] for r in results)
        if late > s.warmup:
            res.flags.append(f"a generator started {late:.2f} s late (after the warm-up)")
    except RunError as exc:
        res.error = str(exc)
        if exc.log:
            res.error += "\n" + exc.log[-1500:]
    except (OSError, ValueError, KeyError) as exc:  # e.g. --evd names no program
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        if gens is not None:
            gens.kill()
        if server is not None:
            res.server_exit = server.stop()
        shutil.rmtree(data, ignore_errors=True)
    res.seconds = round(time.monotonic() - began, 2)
    if res.error is None and res.server_exit is None:
        res.flags.append(f"server did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM (killed)")
    elif res.error is None and res.server_exit != 0:
        res.flags.append(f"server exited with status {res.server_exit}")
    res.flags.extend(diagnose(res))
    return res


def _sleep_until(epoch: float) -> None:
    delay = epoch - time.time()
    if delay > 0:
        time.sleep(delay)


def _fill(res: RunResult, results: list[dict[str, Any]], duration: float) -> None:
    from evd.bench.histogram import Histogram

    hist = Histogram()
    statuses: Counter[str] = Counter()
    accepted = 0
    for r in results:
        hist.merge(Histogram.from_dict(r["hist"]))
        statuses.update(r["statuses"])
        accepted += r["accepted"]
    res.statuses = dict(sorted(statuses.items()))
    res.accepted = accepted
    res.events_per_s = round(accepted / duration, 1)
    res.requests_per_s = round(statuses.get("200", 0) / duration, 1)
    pct = hist.percentiles((50, 99))
    res.p50_ms = round(pct["p50"] / 1000, 2)
    res.p99_ms = round(pct["p99"] / 1000, 2)


def diagnose(res: RunResult) -> list[str]:
    """Flags that say what may have limited a run."""
    if res.error is not None:
        return ["failed"]
    flags = []
    if res.shared:
        flags.append("generator shares the workers' cores")
    gen_capacity = len(parse_cpu_list(res.gen_cores)) if res.gen_cores else 0
    gen_usable = min(gen_capacity, res.gen_procs)
    if not res.shared and gen_usable and res.gen_cpu_cores >= BUSY * gen_usable:
        flags.append(f"generator busy ({res.gen_cpu_cores:.2f} of {gen_usable} cores)")
    if res.shared:
        # Workers and generator share the cores: together they should fill them.
        cores = len(set(parse_cpu_list(res.server_cores)) | set(parse_cpu_list(res.gen_cores)))
        both = res.server_cpu_cores + res.gen_cpu_cores
        if both < BUSY * cores:
            flags.append(f"cores not busy (workers and generator {both:.2f} of {cores})")
    elif res.server_cpu_cores < BUSY * res.workers:
        flags.append(f"workers not busy ({res.server_cpu_cores:.2f} of {res.workers} cores)")
    if noisy(res):
        flags.append(f"machine not quiet (other {res.other_cpu_cores:.2f}, stolen "
                     f"{res.stolen_cpu_cores:.2f} cores)")
    others = {k: v for k, v in res.statuses.items() if k != "200"}
    if others:
        flags.append(f"not 200: {others}")
    if res.events_per_s == 0:
        flags.append("nothing accepted")
    return flags


def noisy(res: RunResult) -> bool:
    """Other processes or the hypervisor took a share of the run's cores."""
    return res.other_cpu_cores + res.stolen_cpu_cores >= NOISY


# -- curves and reports ---------------------------------------------------------------------


@dataclass
class Point:
    workers: int
    events_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_cores: float
    gen_cpu_cores: float
    #: Events/s over the 1-worker figure (or, without one, per worker of the smallest count).
    ratio: float | None
    #: ratio / workers: 1.0 is linear.
    of_linear: float | None
    #: Whether ratio >= 0.8 x workers (None above LINEAR_UP_TO workers or without a base).
    meets: bool | None
    #: Events/s of every run of this point, and which of them had the machine to
    #: themselves (the median is of those when there are any).
    runs: list[float]
    quiet: list[bool]
    flags: list[str]


@dataclass
class Curve:
    fsync: str
    batch: int
    base_workers: int | None
    points: list[Point]
    #: "met", "not met" or why it could not be checked.
    linear_check: str


def curves(results: Sequence[RunResult]) -> list[Curve]:
    """One curve per (fsync, batch): the median run of each worker count, ratios, checks.

    With ``--repeat``, a run whose cores other processes (or the hypervisor) took a
    share of (``noisy``) counts only when no run of that point was quiet.
    """
    groups: dict[tuple[str, int], dict[int, list[RunResult]]] = {}
    for r in results:
        if r.error is None:
            groups.setdefault((r.fsync, r.batch), {}).setdefault(r.workers, []).append(r)
    out = []
    for (fsync, batch), by_n in groups.items():
        base_n = min(by_n)
        medians = {n: _median_run(rs) for n, rs in by_n.items()}
        # The 1-worker figure, or the per-worker figure of the smallest count.
        base = medians[base_n].events_per_s / base_n
        points = []
        for n in sorted(by_n):
            m = medians[n]
            ratio = m.events_per_s / base if base > 0 else None
            of_linear = ratio / n if ratio is not None else None
            meets = (of_linear >= LINEAR_FRACTION
                     if of_linear is not None and n <= LINEAR_UP_TO and n > base_n else None)
            points.append(Point(
                n, m.events_per_s, m.requests_per_s, m.p50_ms, m.p99_ms, m.server_cpu_cores,
                m.gen_cpu_cores, _round(ratio), _round(of_linear), meets,
                [r.events_per_s for r in by_n[n]], [not noisy(r) for r in by_n[n]], m.flags))
        checked = [p for p in points if p.meets is not None]
        if not checked:
            check = "not checked: no count above the base up to 8 workers"
        else:
            failed = [p.workers for p in checked if not p.meets]
            top = max(p.workers for p in checked)
            check = ("met" if not failed else f"not met at {', '.join(map(str, failed))} workers")
            check += f" (checked up to {top} workers" + (
                "" if top >= LINEAR_UP_TO else f"; {LINEAR_UP_TO} not measured") + ")"
        if base_n != 1:
            check += f"; ratios are per worker of the {base_n}-worker run (no 1-worker run)"
        out.append(Curve(fsync, batch, base_n, points, check))
    return sorted(out, key=lambda c: (c.fsync != "always", c.fsync, c.batch))


def _median_run(runs: list[RunResult]) -> RunResult:
    """The median run by events/s, of the quiet runs when there are any."""
    quiet = [r for r in runs if not noisy(r)]
    ordered = sorted(quiet or runs, key=lambda r: r.events_per_s)
    return ordered[(len(ordered) - 1) // 2]


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    return {
        "cpus_online": os.cpu_count(),
        "cpus_allowed": format_cpu_list(sorted(os.sched_getaffinity(0))),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "evd_commit": commit,
    }


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on (from /proc/mounts), or ''."""
    best, kind = "", ""
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mount = parts[1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, parts[2]
    return kind


def _fmt_int(v: float) -> str:
    return f"{v:,.0f}"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: settings, one table per curve, the checks, the notes."""
    m, st = report["machine"], report["settings"]
    lines = [
        "# evd scaling run",
        "",
        (f"CPUs {m['cpus_allowed']} ({m['cpus_online']} online), {m['cpu_model']}, Linux "
         f"{m['kernel']}, Python {m['python']}, evd {m['evd_commit'] or '?'}; data on "
         f"{st['data_filesystem'] or '?'}. Each run: {st['warmup']:g} s warm-up, "
         f"{st['duration']:g} s measured, closed loop of seed events with unique ids "
         f"(`bench.seedload`'s bodies), {st['connections']}; "
         f"{st['repeat']} run(s) per point (median). Took {report['elapsed_s']:.0f} s."),
        "",
    ]
    for c in report["curves"]:
        lines += [
            f"## fsync: {c['fsync']}, batch {c['batch']}",
            "",
            ("| workers | events/s | requests/s | x base | of linear | p50 ms | p99 ms "
             "| server CPU (cores) | generator CPU (cores) | flags |"
             + (" runs (* not quiet) |" if st["repeat"] > 1 else "")),
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if st["repeat"] > 1 else ""),
        ]
        for p in c["points"]:
            mark = {True: " ✓", False: " ✗", None: ""}[p["meets"]]
            lines.append(
                f"| {p['workers']} | {_fmt_int(p['events_per_s'])} "
                f"| {_fmt_int(p['requests_per_s'])} | {_fmt(p['ratio'], '.2f')} "
                f"| {_fmt(p['of_linear'], '.0%')}{mark} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} "
                f"| {p['server_cpu_cores']:.2f} | {p['gen_cpu_cores']:.2f} "
                f"| {'; '.join(p['flags'])} |" + (
                    " " + " ".join(_fmt_int(v) + ("" if q else "*")
                                   for v, q in zip(p["runs"], p["quiet"], strict=True)) + " |"
                    if st["repeat"] > 1 else ""))
        lines += ["", f"0.8 x linear up to {LINEAR_UP_TO} workers: {c['linear_check']}.", ""]
    t = report["target"]
    lines += [(f"Target at batch 100, fsync always (16 cores): {TARGET_EVENTS_PER_S:,} "
               f"events/s: {t}."), ""]
    lines += [("| run | server cores | generator cores (procs) | connections | seconds "
               "| server CPU by process | statuses |"), "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        name = f"{r['fsync']} b{r['batch']} w{r['workers']}" + (
            f" #{r['repeat'] + 1}" if st["repeat"] > 1 else "")
        what = r["statuses"] if r["error"] is None else "FAILED: " + r["error"].splitlines()[0]
        lines.append(
            f"| {name} | {r['server_cores']} | {r['gen_cores']} ({r['gen_procs']}) "
            f"| {r['connections']} | {r['seconds']:.1f} "
            f"| {' '.join(f'{v:.2f}' for v in r['server_cpu_by_process'])} | {what} |")
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def target_check(cs: Sequence[Curve], cpus: int) -> str:
    best = max((p.events_per_s for c in cs if c.fsync == "always" and c.batch == 100
                for p in c.points), default=None)
    if best is None:
        return "not measured (no batch-100 run with fsync always)"
    verdict = "met" if best >= TARGET_EVENTS_PER_S else "not met"
    return f"{verdict}: best {best:,.0f} events/s" + (
        "" if cpus >= 16 else f" (on {cpus} cores: the target is for 16)")


# -- main ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaling",
        description="The scaling curve of evd serve --workers N: events/s accepted per worker "
                    "count, batch size and fsync policy, in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8,12", help="worker counts")
    p.add_argument("--batches", default="1,100", help="events per request")
    p.add_argument("--fsync", default="always,never",
                   help="log.fsync policies (never shows what the disk's fsync costs)")
    p.add_argument("--gen-cores", default=None,
                   help="CPUs of the load generator, e.g. 12-15 (default: those the largest "
                        "worker count leaves free)")
    p.add_argument("--gen-procs", type=int, default=None,
                   help="generator processes (default: one per generator core)")
    p.add_argument("--connections-per-worker", type=int, default=None,
                   help=f"keep-alive connections per worker (default: "
                        f"{CONNECTIONS_PER_WORKER_SMALL} below batch {SMALL_BATCH}, else "
                        f"{CONNECTIONS_PER_WORKER_LARGE})")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of load before the measurement starts")
    p.add_argument("--repeat", type=int, default=1, help="runs per point (median reported)")
    p.add_argument("--out", default="bench-out/scaling",
                   help="directory for scaling.json, scaling.md and the servers' logs")
    p.add_argument("--data-root", default=None,
                   help="where the servers' data directories go (default: --out; keep it "
                        "on the disk under test, not tmpfs)")
    p.add_argument("--evd", default=f"{shlex.quote(sys.executable)} -m evd",
                   help="command that runs evd (e.g. another checkout's venv/bin/evd)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run, wait up to S seconds for the cores it uses to be "
                        "idle (other processes under 0.1 cores for 2 s; on a shared machine)")
    p.add_argument("--time-limit", type=float, default=600.0,
                   help="seconds for the whole run: runs that would end later are skipped")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        raise ValueError("--duration must be > 0, --warmup >= 0, --repeat >= 1")
    if args.gen_procs is not None and args.gen_procs < 1:
        raise ValueError("--gen-procs must be >= 1")
    if args.connections_per_worker is not None and args.connections_per_worker < 1:
        raise ValueError("--connections-per-worker must be >= 1")
    out = Path(args.out).absolute()  # the servers run in their data directories
    return Settings(
        workers=parse_int_list(args.workers, "--workers"),
        batches=parse_int_list(args.batches, "--batches"),
        fsync=parse_fsync_list(args.fsync),
        duration=args.duration, warmup=args.warmup, repeat=args.repeat,
        gen_procs=args.gen_procs, connections_per_worker=args.connections_per_worker,
        evd=shlex.split(args.evd), out=out,
        data_root=Path(args.data_root).absolute() if args.data_root else out,
        time_limit=args.time_limit, wait_quiet=args.wait_quiet)


def _raise_fd_limit() -> None:
    """Many connections per process: lift the soft open-files limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the run as Ctrl-C does (the finally blocks stop the children)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_generate"]:
        return _generator_main(json.loads(argv[1]))
    args = _parser().parse_args(argv)
    try:
        s = _settings(args)
        allowed = sorted(os.sched_getaffinity(0))
        gen = parse_cpu_list(args.gen_cores) if args.gen_cores else None
        placements, notes = plan_placements(s.workers, allowed, gen)
    except ValueError as exc:
        print(f"bench.scaling: {exc}", file=sys.stderr)
        return 2
    if not placements:
        print("bench.scaling: no worker count fits this machine", file=sys.stderr)
        return 2
    s.out.mkdir(parents=True, exist_ok=True)
    s.data_root.mkdir(parents=True, exist_ok=True)
    fs = filesystem_of(s.data_root)
    if fs in ("tmpfs", "ramfs"):
        notes.append(f"the data directories are on {fs}: fsync costs nothing there "
                     "(use --data-root on the disk under test)")
    _raise_fd_limit()

    def say(text: str) -> None:
        print(text, flush=True)

    plan = [(rep, fsync, batch, place) for rep in range(s.repeat) for fsync in s.fsync
            for batch in s.batches for place in placements]
    per_run = s.warmup + s.duration + OVERHEAD_GUESS_S
    say(f"bench.scaling: {len(plan)} runs, about {len(plan) * per_run / 60:.1f} min "
        f"(limit {s.time_limit:g} s); cores allowed {format_cpu_list(allowed)}")
    for p in placements:
        say(f"  {p.workers:>3} workers on cores {format_cpu_list(p.server_cores):<8} "
            f"generator on {format_cpu_list(p.gen_cores)}" + ("  (shared)" if p.shared else ""))
    for n in notes:
        say(f"  note: {n}")
    began = time.monotonic()
    results: list[RunResult] = []
    skipped = 0
    interrupted = False
    with _terminate_as_interrupt():
        try:
            for rep, fsync, batch, place in plan:
                elapsed = time.monotonic() - began
                overhead = (statistics.mean(r.seconds for r in results) - s.warmup - s.duration
                            if results else OVERHEAD_GUESS_S)
                if elapsed + s.warmup + s.duration + max(overhead, 0.0) > s.time_limit:
                    skipped += 1
                    continue
                if s.wait_quiet > 0:
                    cores = sorted(set(place.server_cores) | set(place.gen_cores))
                    limit = min(s.wait_quiet, s.time_limit - elapsed)
                    if not wait_quiet(cores, limit):
                        say(f"  (cores {format_cpu_list(cores)} still busy after {limit:.0f} s)")
                r = run_one(s, place, batch, fsync, rep)
                results.append(r)
                if r.error:
                    say(f"  {fsync:<6} batch {batch:<4} {place.workers:>3} workers: FAILED: "
                        f"{r.error.splitlines()[0]}")
                else:
                    say(f"  {fsync:<6} batch {batch:<4} {place.workers:>3} workers: "
                        f"{r.events_per_s:>12,.0f} events/s {r.requests_per_s:>10,.0f} req/s "
                        f"p50 {r.p50_ms:6.1f} p99 {r.p99_ms:6.1f} ms  server "
                        f"{r.server_cpu_cores:5.2f} gen {r.gen_cpu_cores:5.2f} cores"
                        + (f"  [{'; '.join(r.flags)}]" if r.flags else ""))
        except KeyboardInterrupt:
            interrupted = True
            say("bench.scaling: interrupted; writing what was measured")
    if skipped:
        notes.append(f"{skipped} runs skipped: they would have ended after --time-limit "
                     f"{s.time_limit:g} s")
    if interrupted:
        notes.append("interrupted before the end")
    cs = curves(results)
    report = {
        "machine": machine_info(),
        "settings": {
            **{k: v for k, v in asdict(s).items() if k not in ("out", "data_root", "evd")},
            "evd": " ".join(s.evd), "data_filesystem": fs,
            "connections": (f"{s.connections_per_worker} connections per worker"
                            if s.connections_per_worker else
                            f"{CONNECTIONS_PER_WORKER_SMALL} connections per worker below "
                            f"batch {SMALL_BATCH}, {CONNECTIONS_PER_WORKER_LARGE} from it"),
        },
        "placements": [{"workers": p.workers, "server_cores": format_cpu_list(p.server_cores),
                        "gen_cores": format_cpu_list(p.gen_cores), "shared": p.shared}
                       for p in placements],
        "elapsed_s": round(time.monotonic() - began, 1),
        "runs": [asdict(r) for r in results],
        "curves": [asdict(c) for c in cs],
        "target": target_check(cs, len(allowed)),
        "notes": notes,
    }
    (s.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (s.out / "scaling.md").write_text(text)
    say("")
    say(text)
    say(f"wrote {s.out / 'scaling.json'} and {s.out / 'scaling.md'}")
    if interrupted:
        return 130
    return 0 if results and all(r.error is None for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
