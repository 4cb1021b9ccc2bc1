"""One generator process: builds request bodies and sends its share of the load.

Open loop: batch ``j`` has an intended send time from the global schedule
(``evd.bench.plan``); its latency is measured from that time, not from when a
connection became free, so a slow server cannot hide queueing from the numbers
(no coordinated omission). Closed loop: each connection sends the next batch as
soon as the previous response arrives, and latency is the plain service time.

The process reports progress and, at the end, one result dict (plain data,
histograms serialized) on a multiprocessing queue.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
import traceback
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import msgspec
import orjson
import uvloop

from evd.bench.histogram import Histogram
from evd.bench.http import BenchHttpError, ConnectionPool, Target, build_request
from evd.bench.plan import RunPlan, my_batches
from evd.bench.traffic import (
    TrafficModel,
    encode_envelope,
    envelope_from_lines,
    first_timestamp_ms,
    iter_stream_lines,
    rebase_line,
)

log = logging.getLogger("evd.bench")

# Distinct reject reasons kept per process; the rest are counted as "other" so a
# server that puts event ids in its messages cannot blow up the report.
MAX_REASONS = 50
# How often a process reports progress to the harness (s).
PROGRESS_EVERY_S = 0.5
# Pause after a failed connect in closed loop, so a dead target is not spun on.
CLOSED_LOOP_ERROR_PAUSE_S = 0.01
# Closed loop has no rate to size the traffic model's warm start; assume this per
# process (the model re-times events if the real rate differs).
CLOSED_LOOP_RATE_HINT = 20_000.0


class _Interval:
    """Counters for one time-series interval (by completion time)."""

    __slots__ = ("accepted", "done", "errors", "events_done", "lat", "sent_events", "status")

    def __init__(self) -> None:
        self.sent_events = 0
        self.done = 0
        self.events_done = 0
        self.accepted = 0
        self.status: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.lat = Histogram()

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent_events": self.sent_events, "done": self.done,
            "events_done": self.events_done, "accepted": self.accepted,
            "status": self.status, "errors": self.errors, "lat": self.lat.to_dict(),
        }


class _Phase:
    """Counters for the requests whose intended send time falls in one phase."""

    __slots__ = ("events", "lat", "requests", "retry_after", "status")

    def __init__(self) -> None:
        self.requests = 0
        self.events = 0
        self.status: dict[str, int] = {}
        self.lat = Histogram()
        self.retry_after = Histogram()

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "events": self.events, "status": self.status,
                "lat": self.lat.to_dict(), "retry_after": self.retry_after.to_dict()}


class BodySource:
    """Request bodies for this process: generated live or read from a stream file."""

    def __init__(self, plan: RunPlan, proc: int, start_ms: int) -> None:
        self.plan = plan
        self.proc = proc
        self.model: TrafficModel | None = None
        self._lines: Iterator[bytes] | None = None
        self._offset_ms = 0
        self.exhausted = False
        self.gen_s = 0.0
        if plan.replay is not None:
            path = Path(plan.replay)
            self._lines = self._my_lines(path)
            if plan.rebase:
                first = first_timestamp_ms(path)
                self._offset_ms = 0 if first is None else start_ms - first
        else:
            share = (plan.rate / plan.procs) if plan.rate else CLOSED_LOOP_RATE_HINT
            self.model = TrafficModel(plan.traffic, start_ms, rate_hint=share,
                                      user_offset=proc, user_stride=plan.procs, stream=proc)

    def _my_lines(self, path: Path) -> Iterator[bytes]:
        """This process's batches of a stream file: global batch j with j % procs == proc."""
        batch, procs, proc = self.plan.batch, self.plan.procs, self.proc
        for i, line in enumerate(iter_stream_lines(path)):
            if (i // batch) % procs == proc:
                yield line

    def body(self, t_ms: int, hot: bool) -> tuple[bytes, int] | None:
        """Return ``(request body, event count)`` for a batch sent at ``t_ms``; None at EOF."""
        started = time.perf_counter()
        n = self.plan.batch
        if self.model is not None:
            self.model.hot_share = self.plan.spike.hot_share if (hot and self.plan.spike) else 0.0
            raw = encode_envelope(self.model.batch(n, t_ms), t_ms)
        else:
            assert self._lines is not None
            lines = []
            for line in self._lines:
                lines.append(rebase_line(line, self._offset_ms) if self._offset_ms else line)
                if len(lines) == n:
                    break
            if not lines:
                self.exhausted = True
                return None
            n = len(lines)
            raw = envelope_from_lines(lines, t_ms)
        if self.plan.gzip:
            # Level 1: clients compress on phones; speed matters more than ratio.
            raw = gzip.compress(raw, compresslevel=1, mtime=0)
        self.gen_s += time.perf_counter() - started
        return raw, n


class Driver:
    """Runs one process's share of a plan and collects its measurements."""

    def __init__(self, plan: RunPlan, proc: int, queue: Queue[Any]) -> None:
        self.plan = plan
        self.proc = proc
        self.queue = queue
        self.target = Target.parse(plan.target)
        headers = (f"Authorization: Bearer {plan.api_key}\r\n"
                   "Content-Type: application/json\r\n").encode("latin-1")
        if plan.gzip:
            headers += b"Content-Encoding: gzip\r\n"
        self._headers = headers
        self.pool = ConnectionPool(self.target, plan.connections, plan.timeout_s)
        self.latency = Histogram()
        self.send_lag = Histogram()
        self.sched_lag = Histogram()
        self.retry_after = Histogram()
        self.status: dict[str, int] = {}
        self.events_by_status: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.reasons: dict[str, int] = {}
        self.intervals: list[_Interval] = []
        self.phases: dict[str, _Phase] = {}
        self.batches_scheduled = 0
        self.batches_sent = 0
        self.batches_unsent = 0
        self.events_sent = 0
        self.events_unsent = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.done = 0
        self.t0 = 0.0
        self.start_epoch = 0.0

    # ----------------------------------------------------------- bookkeeping
    def _interval(self, t: float) -> _Interval:
        idx = max(0, int((t - self.t0) / self.plan.interval_s))
        while len(self.intervals) <= idx:
            self.intervals.append(_Interval())
        return self.intervals[idx]

    def _phase(self, name: str) -> _Phase:
        phase = self.phases.get(name)
        if phase is None:
            phase = self.phases[name] = _Phase()
        return phase

    def _record(self, key: str, n: int, intended: float, done: float, phase_name: str,
                body: bytes | None, retry_after: float | None) -> None:
        lat_us = int((done - intended) * 1_000_000)
        self.latency.record(lat_us)
        self.status[key] = self.status.get(key, 0) + 1
        self.events_by_status[key] = self.events_by_status.get(key, 0) + n
        self.done += 1
        iv = self._interval(done)
        iv.done += 1
        iv.events_done += n
        iv.status[key] = iv.status.get(key, 0) + 1
        iv.lat.record(lat_us)
        phase = self._phase(phase_name)
        phase.requests += 1
        phase.events += n
        phase.status[key] = phase.status.get(key, 0) + 1
        phase.lat.record(lat_us)
        if retry_after is not None:
            ms = int(retry_after * 1000) if retry_after >= 0 else 0
            self.retry_after.record(ms)
            phase.retry_after.record(ms)
        if key == "200" and body:
            self._count_ack(body, iv)

    def _count_ack(self, body: bytes, iv: _Interval) -> None:
        try:
            ack = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.errors["bad_ack_body"] = self.errors.get("bad_ack_body", 0) + 1
            return
        if not isinstance(ack, dict):
            self.errors["bad_ack_body"] = self.errors.get("bad_ack_body", 0) + 1
            return
        accepted = ack.get("accepted", 0)
        if isinstance(accepted, int):
            self.accepted += accepted
            iv.accepted += accepted
        dups = ack.get("duplicates", 0)
        if isinstance(dups, int):
            self.duplicates += dups
        rejected = ack.get("rejected") or []
        if isinstance(rejected, list):
            self.rejected += len(rejected)
            for item in rejected:
                reason = str(item.get("error", "?"))[:80] if isinstance(item, dict) else "?"
                if reason not in self.reasons and len(self.reasons) >= MAX_REASONS:
                    reason = "other"
                self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _error(self, kind: str, n: int, intended: float, done: float, phase: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self._interval(done).errors[kind] = self._interval(done).errors.get(kind, 0) + 1
        self._record("error:" + kind, n, intended, done, phase, None, None)

    # --------------------------------------------------------------- sending
    async def _send(self, body: bytes, n: int, intended: float, phase: str,
                    waiting: set[asyncio.Task[Any]]) -> bool:
        """Send one batch and record the outcome; False when no HTTP response came."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        request = build_request("POST", self.target, self.plan.events_path,
                                self._headers, body)
        try:
            conn = await self.pool.acquire()
        except BenchHttpError as exc:
            waiting.discard(task)
            self.batches_sent += 1
            self.events_sent += n
            self._error(exc.kind, n, intended, loop.time(), phase)
            return False
        waiting.discard(task)
        sent = loop.time()
        self.send_lag.record(int((sent - intended) * 1_000_000))
        self.batches_sent += 1
        self.events_sent += n
        self._interval(sent).sent_events += n
        try:
            resp = await conn.request(request, self.plan.timeout_s)
        except BenchHttpError as exc:
            self._error(exc.kind, n, intended, loop.time(), phase)
            return False
        finally:
            self.pool.release(conn)
        self._record(str(resp.status), n, intended, loop.time(), phase, resp.body,
                     resp.retry_after)
        return True

    async def run_open(self, source: BodySource,
                       pregen: list[tuple[float, bytes, int]] | None) -> None:
        """Send this process's batches at their scheduled times; measure from schedule."""
        plan = self.plan
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[bool]] = set()
        waiting: set[asyncio.Task[Any]] = set()
        deadline = self.t0 + plan.duration_s
        schedule: Iterator[tuple[float, bytes | None, int]]
        if pregen is not None:
            schedule = iter(pregen)
        else:
            schedule = ((off, None, 0) for _, off in my_batches(plan, self.proc))
        spike = plan.spike
        for off, body, n in schedule:
            intended = self.t0 + off
            if intended >= deadline:
                break
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if spike is not None:
                # A herd is more clients, not the same clients sending faster:
                # the spike brings its share of extra connections and takes them away.
                in_spike = spike.at_s <= off < spike.end_s
                self.pool.set_limit(round(plan.connections * spike.factor) if in_spike
                                    else plan.connections)
            while len(waiting) >= plan.max_backlog:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if body is None:
                made = source.body(int((self.start_epoch + off) * 1000),
                                   plan.phase_of(off) == "spike")
                if made is None:
                    break
                body, n = made
            self.batches_scheduled += 1
            # How late the scheduler itself is (CPU-starved generator), apart from
            # waiting for a free connection (a slow server), which send_lag adds.
            self.sched_lag.record(int((loop.time() - intended) * 1_000_000))
            task = asyncio.create_task(self._send(body, n, intended, plan.phase_of(off),
                                                  waiting))
            tasks.add(task)
            waiting.add(task)
            task.add_done_callback(tasks.discard)
        await self._finish(tasks, waiting, deadline)

    async def run_closed(self, source: BodySource) -> None:
        """Each connection sends the next batch as soon as the previous one is answered."""
        plan = self.plan
        loop = asyncio.get_running_loop()
        deadline = self.t0 + plan.duration_s

        async def worker() -> None:
            while loop.time() < deadline and not source.exhausted:
                off = loop.time() - self.t0
                made = source.body(int(time.time() * 1000), plan.phase_of(off) == "spike")
                if made is None:
                    return
                body, n = made
                self.batches_scheduled += 1
                if not await self._send(body, n, loop.time(), plan.phase_of(off), set()):
                    await asyncio.sleep(CLOSED_LOOP_ERROR_PAUSE_S)

        tasks = {asyncio.create_task(worker()) for _ in range(plan.connections)}
        await asyncio.wait(tasks, timeout=plan.duration_s + plan.timeout_s + 1.0)
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _finish(self, tasks: set[asyncio.Task[bool]], waiting: set[asyncio.Task[Any]],
                      deadline: float) -> None:
        """Stop at the deadline: unsent batches are counted, in-flight ones get ``timeout``."""
        loop = asyncio.get_running_loop()
        delay = deadline - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for task in list(waiting):
            task.cancel()
        # Still waiting for a connection at the deadline: never sent. Counted apart,
        # because their latency (at least deadline - intended) is not in the histogram.
        self.batches_unsent = len(waiting)
        if tasks:
            await asyncio.wait(tasks, timeout=self.plan.timeout_s + 1.0)
        for task in list(tasks):
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                raise res

    async def progress(self) -> None:
        """Report cumulative counters to the harness until cancelled."""
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self.queue.put(("progress", self.proc, self.snapshot()))

    def snapshot(self) -> dict[str, Any]:
        """Small cumulative counters for the progress line."""
        shed = self.status.get("429", 0) + self.status.get("503", 0)
        return {
            "events_sent": self.events_sent, "done": self.done,
            "ok": self.status.get("200", 0), "shed": shed,
            "errors": sum(self.errors.values()), "accepted": self.accepted,
            "p99_us": self.intervals[-1].lat.percentile(99) if self.intervals else 0,
        }

    def result(self, source: BodySource, cpu_s: float, start_delta_s: float,
               pregen_s: float = 0.0) -> dict[str, Any]:
        """Everything measured, as plain data for the harness to merge."""
        return {
            "proc": self.proc,
            "batches_scheduled": self.batches_scheduled,
            "batches_sent": self.batches_sent,
            "batches_unsent": self.batches_unsent,
            "events_sent": self.events_sent,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "status": self.status,
            "events_by_status": self.events_by_status,
            "errors": self.errors,
            "reasons": self.reasons,
            "latency": self.latency.to_dict(),
            "send_lag": self.send_lag.to_dict(),
            "sched_lag": self.sched_lag.to_dict(),
            "retry_after": self.retry_after.to_dict(),
            "intervals": [iv.to_dict() for iv in self.intervals],
            "phases": {name: ph.to_dict() for name, ph in self.phases.items()},
            "generator": dict(source.model.stats) if source.model is not None else None,
            "gen_s": source.gen_s,
            "pregen_s": pregen_s,
            "cpu_s": cpu_s,
            "connects": self.pool.connects,
            "start_delta_s": start_delta_s,
        }


def _pregenerate(plan: RunPlan, proc: int, source: BodySource,
                 start_epoch: float) -> list[tuple[float, bytes, int]]:
    out = []
    for _, off in my_batches(plan, proc):
        if off >= plan.duration_s:
            break
        made = source.body(int((start_epoch + off) * 1000), plan.phase_of(off) == "spike")
        if made is None:
            break
        out.append((off, made[0], made[1]))
    return out


async def _run(plan: RunPlan, proc: int, queue: Queue[Any], go: MpEvent,
               start: Synchronized[float]) -> dict[str, Any]:
    planned = start.value
    source = BodySource(plan, proc, int(planned * 1000))
    pregen = _pregenerate(plan, proc, source, planned) if plan.pregenerate else None
    # Generating before the start does not compete with sending; report it apart.
    pregen_s, source.gen_s = source.gen_s, 0.0
    queue.put(("ready", proc, None))
    # The harness waits for every process (bounded there); this bound only
    # protects an orphan whose harness died.
    if not go.wait(timeout=600):
        raise TimeoutError("harness never gave the start signal")
    driver = Driver(plan, proc, queue)
    driver.start_epoch = start.value
    loop = asyncio.get_running_loop()
    driver.t0 = loop.time() + (driver.start_epoch - time.time())
    cpu0 = time.process_time()
    reporter = asyncio.create_task(driver.progress())
    try:
        if plan.mode == "open":
            await driver.run_open(source, pregen)
        else:
            delay = driver.t0 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await driver.run_closed(source)
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
        driver.pool.close()
    return driver.result(source, time.process_time() - cpu0, start.value - planned, pregen_s)


def child_main(plan_bytes: bytes, proc: int, queue: Queue[Any], go: MpEvent,
               start: Synchronized[float]) -> None:
    """Entry point of a generator process (spawned by the harness)."""
    plan = msgspec.msgpack.decode(plan_bytes, type=RunPlan)
    try:
        result = uvloop.run(_run(plan, proc, queue, go, start))
    except BaseException:
        # The harness shows this and fails the run; re-raise for a non-zero exit.
        queue.put(("error", proc, traceback.format_exc()))
        raise
    queue.put(("result", proc, result))
