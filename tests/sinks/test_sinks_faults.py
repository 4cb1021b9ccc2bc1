"""Sink faults through the real server (two workers), with real files and a real
webhook target on 127.0.0.1:

- Outage: the webhook answers 503 (with ``Retry-After``) while a load is
  posted. The lake and the warehouse hold every accepted event within a bound
  of the posting's end all the same (the webhook's loop only slows itself), the
  webhook sink's lag gauges rise with the outage and its retries count, the
  503s come no faster than ``Retry-After`` allows; once the target recovers,
  every accepted event reaches it and the lag falls back to 0; the audit adds up.
- Refusal: the webhook answers 400 to a batch holding a poison event; that
  batch goes to ``dead_letter`` (stage ``sink:<name>``, in the warehouse) at
  once, is counted in ``evd_sink_dead_lettered_total`` and by the audit, and
  every other event is delivered.
- Crash: the server is SIGKILLed at random moments under continuous load while
  the sinks deliver, and restarted on the same data dir: every accepted event is
  in the warehouse exactly once and in the lake at least once, the lake's
  duplicates stay within the bound evd.sinks.lake.sink states, and the audit counts
  each delivery once.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest
from evdtest import HOST, EvdServer, ServerFactory, batch, gone, post, request, run_cli
from sinkcheck import file_rows, lake_rows, listening, query, wait_for

pytestmark = pytest.mark.workers_independent

WORKERS = 2
TWO = ["--workers", str(WORKERS)]
GAP_MS = 1_000
PROCESSING: dict[str, Any] = {
    "idle_timeout_ms": 2000, "session_gap_ms": GAP_MS, "max_out_of_orderness_ms": 3000,
}
HOOK = "hook"
HOOK_AUTH = "Bearer hook-secret"
#: What the webhook target asks for in its 503s.
RETRY_AFTER_S = 1
#: Generous on a noisy 2-core machine; an unslowed lake and warehouse take 1-2 s.
NOT_SLOWED_S = 15.0
#: The webhook sink's retries: enough never to give up during the outage, back-offs
#: short enough that a sink ignoring Retry-After would send several requests a second.
PATIENT = {"max_attempts": 1000, "initial_backoff_s": 0.05, "max_backoff_s": 0.3}


# -- the webhook target ------------------------------------------------------------------


class Webhook:
    """A webhook target on 127.0.0.1: answers 503 (with Retry-After) while ``down``,
    400 to a batch holding an id in ``poison``, 200 otherwise; records every id it
    took (200) and refused with a 400, and the time of every 503."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down = False
        self.poison: frozenset[str] = frozenset()
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.refused_at: list[float] = []
        #: Requests whose body or headers were not what the sink promises.
        self.malformed: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self._body()
                status, extra = hook.answer(self.path, dict(self.headers.items()), body)
                payload = b'{"ok": false}' if status != 200 else b'{"ok": true}'
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length", "0")))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per request would drown the test's output

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        try:
            doc = json.loads(body)
            ids = [item["event_id"] for item in doc["items"]]
            shape_ok = (doc["sink"], doc["stream"], doc["count"]) == (HOOK, "events", len(ids))
        except (ValueError, KeyError, TypeError) as exc:
            ids, shape_ok = [], False
            self.malformed.append(f"{exc!r}: {body[:200]!r}")
        with self.lock:
            if not shape_ok or headers.get("Authorization") != HOOK_AUTH or path != "/hook":
                self.malformed.append(f"{path} {headers} {body[:200]!r}")
            if self.down:
                self.refused_at.append(time.monotonic())
                return 503, {"Retry-After": str(RETRY_AFTER_S)}
            if self.poison.intersection(ids):
                self.rejected.update(ids)
                return 400, {}
            self.received.update(ids)
            return 200, {}

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.received)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with Webhook() as hook:
        yield hook


# -- metrics ------------------------------------------------------------------------------

SINK_SAMPLE = re.compile(r'^(evd_sink_[a-z_]+)\{sink="([^"]+)"\} (\S+)$', re.MULTILINE)


def sink_metrics(port: int) -> dict[tuple[str, str], float]:
    """(family, sink) -> value of every sink sample without other labels on /metrics."""
    text = request(port, "GET", "/metrics", timeout=5).body.decode()
    return {(m[1], m[2]): float(m[3]) for m in SINK_SAMPLE.finditer(text)}


class Scraper:
    """Samples one sink's lag and counters on /metrics every ``every`` s, in a thread."""

    def __init__(self, port: int, sink: str, every: float = 0.25) -> None:
        self.port, self.sink, self.every = port, sink, every
        #: (monotonic time, lag seconds, lag bytes, retries)
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                m = sink_metrics(self.port)
            except (OSError, http.client.HTTPException):
                continue  # a missed sample; the next one comes in `every` s
            s = self.sink
            self.samples.append((time.monotonic(), m.get(("evd_sink_lag_seconds", s), -1.0),
                                 m.get(("evd_sink_lag_bytes", s), -1.0),
                                 m.get(("evd_sink_retries_total", s), -1.0)))

    def between(self, start: float, end: float) -> list[tuple[float, float, float, float]]:
        return [s for s in self.samples if start <= s[0] <= end]


# -- helpers ------------------------------------------------------------------------------


def post_all(port: int, bodies: list[bytes]) -> None:
    for body in bodies:
        resp = post(port, body)
        assert resp.status == 200, resp.body
        assert resp.json()["rejected"] == [], resp.body


def warehouse_ids(data: Path) -> list[str]:
    return [r[0] for r in query(data, "SELECT event_id FROM events")]


def lake_ids(data: Path) -> Counter[str]:
    return Counter(r["event_id"] for r in lake_rows(data / "lake", "events"))


def audit_reports(data: Path) -> list[dict[str, Any]]:
    """The audit once it adds up (exit 0), as JSON rows."""
    wait_for("the audit to add up",
             lambda: run_cli("audit", "--data-dir", str(data)).returncode == 0, timeout=30)
    audit = run_cli("audit", "--data-dir", str(data), "--json")
    assert audit.returncode == 0, audit.stdout + audit.stderr
    return [json.loads(line) for line in audit.stdout.splitlines()]


def audit_sum(reports: list[dict[str, Any]], sink: str, metric: str) -> int:
    return sum(r["sinks"][sink][metric] for r in reports)


def hook_sink(url: str, **batch: Any) -> dict[str, Any]:
    return {"name": HOOK, "type": "http", "url": url, "headers": {"Authorization": HOOK_AUTH},
            "streams": ["events"], "batch": {"max_events": 1000, "max_age_s": 0.2, **batch},
            "retry": PATIENT, "timeout_s": 5}


# -- outage -------------------------------------------------------------------------------


def test_webhook_outage_loses_nothing_and_slows_no_other_sink(
    servers: ServerFactory, rng: random.Random, webhook: Webhook
) -> None:
    """6,000 events while the webhook answers 503: the lake and the warehouse are
    complete regardless, the webhook's lag rises and falls, nothing is lost."""
    config = {
        "log": {"partitions": 4},
        "processing": PROCESSING,
        "sinks": [
            {"name": "lake", "type": "files", "streams": ["events"], "batch": {"max_age_s": 0.5}},
            {"name": "warehouse", "type": "sqlite", "streams": ["events"],
             "batch": {"max_age_s": 0.2}},
            hook_sink(webhook.url),
        ],
    }
    webhook.down = True
    server = servers.start(config, args=TWO)
    data = server.data_dir
    events = listening(rng, 500, 6000, int(time.time() * 1000), GAP_MS, span_ms=3000)
    accepted = {e["event_id"] for e in events}
    with Scraper(server.port, HOOK) as scraper:
        t_first = time.monotonic()
        post_all(server.port, [batch(events[i: i + 250]) for i in range(0, len(events), 250)])
        t_posted = time.monotonic()

        # The other sinks are not held back by the failing one.
        wait_for(
            "the warehouse and the lake to hold every event while the webhook is down",
            lambda: set(warehouse_ids(data)) == accepted and set(lake_ids(data)) == accepted,
            timeout=NOT_SLOWED_S, every=0.2,
        )
        others_s = time.monotonic() - t_posted
        wait_for("the webhook to refuse batches", lambda: len(webhook.refused_at) >= 2,
                 timeout=10, every=0.1)
        assert webhook.ids() == set()
        # Keep the target down a while longer, so the lag has something to show.
        time.sleep(max(0.0, t_posted + 4.0 - time.monotonic()))
        during = sink_metrics(server.port)
        t_recover = time.monotonic()
        with webhook.lock:
            webhook.down = False
            refused = list(webhook.refused_at)

        wait_for("every accepted event to reach the webhook after it recovered",
                 lambda: webhook.ids() >= accepted, timeout=60, every=0.2)
        t_caught_up = time.monotonic()
        wait_for(
            "the webhook sink's lag to fall back to 0",
            lambda: bool(scraper.samples) and scraper.samples[-1][0] > t_caught_up
            and scraper.samples[-1][1:3] == (0.0, 0.0),
            timeout=20, every=0.2,
        )
        t_zero = scraper.samples[-1][0]
    outage = scraper.between(t_first, t_recover)
    after = scraper.between(t_recover, t_zero)
    print(f"lake + warehouse complete {others_s:.1f}s after posting; outage"
          f" {t_recover - t_first:.1f}s, {len(refused)} 503s; lag during the outage"
          f" (s, bytes): {[(round(s[1], 1), s[2]) for s in outage[::4]]}; after recovery:"
          f" {[(round(s[1], 1), s[2]) for s in after]}")

    assert webhook.malformed == []
    assert webhook.ids() == accepted
    # The lag rose with the outage: the oldest undelivered event is as old as the
    # outage (give or take the batching and the gauge's interval), bytes are waiting.
    assert during[("evd_sink_lag_bytes", HOOK)] > 0, during
    assert during[("evd_sink_lag_seconds", HOOK)] >= (t_recover - t_first) - 3, (
        f"lag gauge {during[('evd_sink_lag_seconds', HOOK)]} s after an outage of"
        f" {t_recover - t_first:.1f} s; samples: {outage}")
    assert during[("evd_sink_retries_total", HOOK)] > 0, during
    assert during[("evd_sink_lag_seconds", "warehouse")] < 3, during
    # ... and fell back to 0 (checked above); nothing was given up on.
    final = sink_metrics(server.port)
    assert final[("evd_sink_dead_lettered_total", HOOK)] == 0, final
    assert final[("evd_sink_delivered_total", HOOK)] >= len(accepted), final
    # Retry-After was honoured: each worker's loop sends one request per Retry-After.
    span = refused[-1] - refused[0]
    assert len(refused) <= WORKERS * (span / RETRY_AFTER_S + 1) + 2, (len(refused), span)

    reports = audit_reports(data)
    for sink in ("lake", "warehouse", HOOK):
        assert audit_sum(reports, sink, "delivered") == len(accepted), (sink, reports)
    assert server.stop() == 0, server.log_text()


# -- refusal ------------------------------------------------------------------------------


def test_webhook_400_dead_letters_the_batch(
    servers: ServerFactory, rng: random.Random, webhook: Webhook
) -> None:
    """2,000 events, 5 of them poison: their batches are dead-lettered on the 400,
    every other event is delivered, the metric and the audit count them."""
    config = {
        "log": {"partitions": 4},
        "processing": PROCESSING,
        "sinks": [
            {"name": "warehouse", "type": "sqlite", "streams": ["events", "dead_letter"],
             "batch": {"max_age_s": 0.2}},
            hook_sink(webhook.url, max_events=200),
        ],
    }
    server = servers.start(config, args=TWO)
    data = server.data_dir
    events = listening(rng, 300, 2000, int(time.time() * 1000), GAP_MS, span_ms=2000)
    for i in rng.sample(range(len(events)), 5):
        events[i]["event_id"] = f"poison-{i}"
    webhook.poison = frozenset(e["event_id"] for e in events if e["event_id"].startswith("poison"))
    accepted = {e["event_id"] for e in events}
    post_all(server.port, [batch(events[i: i + 200]) for i in range(0, len(events), 200)])

    def settled() -> bool:
        with webhook.lock:
            return set(webhook.received) | set(webhook.rejected) >= accepted

    wait_for("every event to be taken or refused by the webhook", settled, timeout=60, every=0.2)
    rejected = set(webhook.rejected)
    assert webhook.poison <= rejected
    assert rejected.isdisjoint(webhook.received)
    assert set(webhook.received) | rejected == accepted
    # A 400 is final: each refused batch was sent once, never retried.
    assert max(webhook.rejected.values()) == 1, webhook.rejected.most_common(3)
    assert webhook.malformed == []

    def letters() -> list[tuple[str, str, str]]:
        return query(data, "SELECT event, reason, stream FROM dead_letter WHERE stage = ?",
                     f"sink:{HOOK}")

    wait_for("the refused items in the warehouse's dead_letter table",
             lambda: len(letters()) >= len(rejected), timeout=30, every=0.2)
    got = letters()
    assert sorted(json.loads(event)["event_id"] for event, _, _ in got) == sorted(rejected)
    assert {stream for _, _, stream in got} == {"events"}
    assert all("400" in reason for _, reason, _ in got), got[:3]
    assert query(data, "SELECT count(*) FROM dead_letter WHERE stage != ?", f"sink:{HOOK}") == [(0,)]

    m = sink_metrics(server.port)
    assert m[("evd_sink_dead_lettered_total", HOOK)] == len(rejected), m
    assert m[("evd_sink_retries_total", HOOK)] == 0, m
    reports = audit_reports(data)
    assert audit_sum(reports, HOOK, "dead_lettered") == len(rejected)
    assert audit_sum(reports, HOOK, "delivered") == len(accepted) - len(rejected)
    assert audit_sum(reports, "warehouse", "delivered") == len(accepted)
    assert server.stop() == 0, server.log_text()


# -- crash --------------------------------------------------------------------------------

KILLS = 3
PER_POST = 100
#: One POST at most this often (about 2,000 events/s): continuous, but a load the
#: 2-core machine delivers as it comes.
POST_PERIOD_S = 0.05
#: Small lake batches: files roll every few tenths of a second, so a kill lands in
#: or near a write, and the duplicate bound below means something.
LAKE_MAX_EVENTS = 1000
CRASH_CONFIG: dict[str, Any] = {
    "log": {"partitions": 4},
    "processing": PROCESSING,
    "snapshot": {"interval_s": 0.5},
    "sinks": [
        {"name": "lake", "type": "files", "streams": ["events"],
         "batch": {"max_events": LAKE_MAX_EVENTS, "max_age_s": 0.3}},
        {"name": "warehouse", "type": "sqlite", "streams": ["events"],
         "batch": {"max_events": 1000, "max_age_s": 0.2}},
    ],
}
#: evd.sinks.lake.sink: a kill leaves at most one batch per worker written and not
#: committed, ``batch.max_events`` items plus those of the record that crossed the
#: bound (one record: one request's events of one partition, at most PER_POST).
LAKE_DUPLICATE_BOUND = KILLS * WORKERS * (LAKE_MAX_EVENTS + PER_POST)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} alive after the supervisor died"
        time.sleep(0.01)


def ledger_delivered(data: Path, stage: str) -> int:
    """Events the ledger counts as delivered by ``stage`` (read with the server dead)."""
    conn = sqlite3.connect(data / "audit.sqlite3", timeout=30)
    try:
        row = conn.execute(
            "SELECT coalesce(sum(n), 0) FROM counts WHERE stage = ? AND stream = 'events'"
            " AND metric = 'delivered'", (stage,)).fetchone()
        return int(row[0])
    finally:
        conn.close()


def missing_and_extra(expected: set[str], got: Counter[str] | set[str]) -> tuple[set[str], set[str]]:
    return expected - set(got), set(got) - expected


PART_NAME = re.compile(r"^part-w(\d+)-(\d+)-(\d+)\.")


def lake_files(data: Path) -> dict[str, list[str]]:
    """The event ids of every finished events file of the lake, by file name."""
    return {p.name: [r["event_id"] for r in file_rows(p)]
            for p in sorted((data / "lake" / "events").rglob("part-*"))}


def written_ms(name: str) -> int:
    """When the files sink named a lake file (epoch ms)."""
    m = PART_NAME.match(name)
    assert m, name
    return int(m[2])


def not_crash_copies(files: dict[str, list[str]], kills_ms: list[float]) -> list[str]:
    """What breaks the files sink's crash bound (empty: nothing).

    An event in the lake more than once must have its first copy in a file that a
    kill caught written but not committed: then the whole file was written again
    (every row of it is in a later file), and it is among the last files its worker
    wrote before that kill (one batch per worker; a batch writes one file per hour,
    so at most two files per worker and kill).
    """
    where: dict[str, list[tuple[int, int, str]]] = {}
    stamp: dict[str, tuple[int, int]] = {}
    for name, ids in files.items():
        m = PART_NAME.match(name)
        assert m, name
        stamp[name] = (int(m[1]), int(m[2]))
        for i in ids:
            where.setdefault(i, []).append((int(m[2]), int(m[3]), name))
    first = {i: min(copies)[2] for i, copies in where.items() if len(copies) > 1}
    originals = set(first.values())
    problems = []
    per_kill: Counter[tuple[int, float]] = Counter()
    for name in sorted(originals):
        worker, at = stamp[name]
        if any(len(where[i]) < 2 for i in files[name]):
            problems.append(f"{name}: holds copies of other files' rows, and rows of its own")
        kill = min((k for k in kills_ms if k >= at), default=None)
        if kill is None:
            problems.append(f"{name}: duplicated rows in a file no kill caught")
            continue
        per_kill[worker, kill] += 1
        newer = [n for n, (w, t) in stamp.items() if w == worker and at < t <= kill
                 and n not in originals]
        if newer:
            problems.append(f"{name}: duplicated, but worker {worker} wrote {newer} after it"
                            " before the kill")
    problems += [f"worker {w}: {n} files duplicated at the kill at {k}"
                 for (w, k), n in per_kill.items() if n > 2]
    return problems


def twice(ids: list[str]) -> set[str]:
    return {i for i, n in Counter(ids).items() if n > 1}


class Client:
    """Posts fresh events (timestamps: now) one request at a time; a request that got
    no answer is sent again, as a client would, until it is answered 200."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.accepted: set[str] = set()
        self.unanswered = 0
        self._n = 0
        self._body: bytes | None = None
        self._ids: list[str] = []

    def _next(self) -> None:
        self._n += 1
        now = int(time.time() * 1000)
        events = listening(self.rng, 400, PER_POST, now, GAP_MS, span_ms=50)
        for j, e in enumerate(events):
            e["event_id"] = f"c{self._n}-{j}"
        self._body, self._ids = batch(events), [e["event_id"] for e in events]

    def run(self, server: EvdServer, until: Callable[[], bool]) -> None:
        """Post until ``until()`` (checked between requests) or the server died."""
        due = time.monotonic()
        while not until():
            if self._body is None:
                self._next()
            assert self._body is not None
            try:
                r = post(server.port, self._body)
            except (OSError, http.client.HTTPException):
                r = None
            if r is not None and r.status == 200:
                assert r.json()["rejected"] == [], r.body
                self.accepted.update(self._ids)
                self._body = None
            else:
                assert r is None or r.status == 503, (r, server.log_text())
                if server.proc.poll() is not None:
                    self.unanswered += r is None
                    return  # killed: the same body goes to the next server
            due = max(due + POST_PERIOD_S, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))


def test_kill_9_during_delivery_loses_nothing(
    servers: ServerFactory, rng: random.Random
) -> None:
    """Three SIGKILLs under continuous load, restarts on the same data dir: no event
    missing from a sink, none twice in the warehouse, the lake within its bound."""
    t_start = time.monotonic()
    server = servers.start(CRASH_CONFIG, args=TWO)
    data = server.data_dir
    client = Client(rng)
    at_kill: list[dict[str, int]] = []
    kills_ms: list[float] = []

    def kill(pid: int) -> None:
        kills_ms.append(time.time() * 1000)
        os.kill(pid, signal.SIGKILL)

    for _ in range(KILLS):
        timer = threading.Timer(rng.uniform(1.5, 3.0), kill, (server.proc.pid,))
        timer.start()
        try:
            client.run(server, until=lambda: False)
        finally:
            timer.cancel()
        assert server.proc.wait(10) == -signal.SIGKILL, server.log_text()
        pids = list(server.worker_pids().values())
        assert len(pids) == WORKERS, server.log_text()
        wait_gone(pids)
        at_kill.append({
            "accepted": len(client.accepted),
            "lake_behind": len(client.accepted) - ledger_delivered(data, "lake"),
            "warehouse_behind": len(client.accepted) - ledger_delivered(data, "warehouse"),
            "tmp_files": sum(1 for _ in (data / "lake").rglob(".part-*.tmp")),
        })
        server = servers.start(CRASH_CONFIG, data_dir=data, args=TWO)
    end = time.monotonic() + 2.0
    client.run(server, until=lambda: time.monotonic() >= end)
    assert server.proc.poll() is None, server.log_text()
    accepted = client.accepted

    wait_for("the warehouse to hold every accepted event",
             lambda: len(set(warehouse_ids(data)) & accepted) == len(accepted), timeout=60)
    wait_for("the lake to hold every accepted event",
             lambda: lake_ids(data).keys() >= accepted, timeout=60)
    reports = audit_reports(data)
    assert server.stop() == 0, server.log_text()

    stored = warehouse_ids(data)
    files = lake_files(data)
    lake = Counter(i for ids in files.values() for i in ids)
    dups = {i: n for i, n in lake.items() if n > 1}
    extra_copies = sum(n - 1 for n in dups.values())
    dup_files = sorted(name for name, ids in files.items() if dups.keys() & set(ids))
    print(f"{len(accepted)} events accepted, {client.unanswered} requests unanswered at a kill"
          f" and sent again; at each kill: {at_kill}; lake: {extra_copies} extra copies of"
          f" {len(dups)} events in {len(dup_files)} files (bound {LAKE_DUPLICATE_BOUND});"
          f" whole test {time.monotonic() - t_start:.1f}s")

    # The kills hit a pipeline with deliveries in progress, and restarts happened.
    assert len(servers.servers) == KILLS + 1
    assert sum(k["lake_behind"] + k["warehouse_behind"] for k in at_kill) > 0, at_kill
    # Every accepted event: in the warehouse exactly once, in the lake at least once.
    assert missing_and_extra(accepted, set(stored)) == (set(), set())
    assert twice(stored) == set()
    assert missing_and_extra(accepted, lake) == (set(), set())
    # The lake's duplicates: the batches written and not committed at the kills.
    assert extra_copies <= LAKE_DUPLICATE_BOUND, (extra_copies, dup_files)
    assert max(lake.values()) <= KILLS + 1
    assert not_crash_copies(files, kills_ms) == [], dup_files
    # The audit counts every event once per sink, however often it was written.
    dropped = sum(r["duplicate"] for r in reports)
    assert sum(r["accepted"] for r in reports) - dropped == len(accepted), reports
    for sink in ("lake", "warehouse"):
        assert audit_sum(reports, sink, "delivered") == len(accepted), (sink, reports)

    # Negative controls: the checks notice an event missing from a sink, one that
    # was never accepted, and a duplicate in the warehouse.
    lost = rng.choice(sorted(accepted))
    assert missing_and_extra(accepted, set(stored) - {lost}) == ({lost}, set())
    assert missing_and_extra(accepted, lake + Counter(["never-posted"])) == (set(), {"never-posted"})
    assert twice([*stored, lost]) == {lost}
    # ... and a lake file holding a copy of an event outside the crash bound.
    last = max(files, key=written_ms)
    stray = {**files, f"part-w00-{int(kills_ms[-1]) + 10**6}-000001.ndjson.gz": [files[last][0]]}
    assert not_crash_copies(stray, kills_ms) != []
