"""Memory of the partition processor grows with the open sessions, the sessions kept
for the allowed lateness and the dedup window, never with the users ever seen.

Each measurement runs in its own interpreter (this file run as a script), so the
resident set is its own: 1,000,000 users each send one short session (play, then end,
in records of 100 events); sessions close as the watermark passes them, are kept for
the allowed lateness (a minute of event time here: about 6,000 users' sessions) and
then forgotten, and a final tick closes and forgets the rest. Afterwards the process
holds what it held at start-up plus the dedup window (2,000,000 remembered ids, all
within the window), within 20 %. The window's bytes per id are measured in another
interpreter that fills a DedupWindow alone with the same ids; bytes per open session
are measured with 100,000 open ones, bytes per kept (emitted) session with 100,000
kept ones. The negative control keeps every closed session alive (what a table that
never forgets would hold) and the same check must fail.

With the default allowed lateness (an hour) the kept sessions are those that closed
within the last hour of event time: ``test_kept_sessions_are_those_of_the_lateness``
checks their number, which is what the memory above the dedup window scales with.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from evd.core.config import ProcessingConfig
from evd.core.schema import Device, Event, Geo, Playback, RawBatch, Session
from evd.state.dedup import DedupWindow
from evd.state.processor import Outputs, PartitionProcessor
from evd.state.sessions import SessionTable

pytestmark = pytest.mark.workers_independent

USERS = 1_000_000
#: Allowed lateness of the million-user run: 6,000 users' sessions kept at a time.
LATENESS_MS = 60_000
#: |RSS after - (RSS at start-up + dedup window)| must stay within this share of the latter.
TOLERANCE = 0.20
#: Generous for a loaded 2-core machine; the three children take about 30 s there.
CHILD_TIMEOUT_S = 110

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE = 1_700_000_040_000
NOW = 1_800_000_000_000
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _records(
    users: int, first: int = 0, spacing_ms: int = 10, end: bool = True
) -> Iterator[RawBatch]:
    """Records of 100 events: per user a play and, with ``end``, its end a second later.

    Every string is a fresh object, as decoding a record gives; user u starts at
    BASE + u * spacing_ms.
    """
    per_record = 50 if end else 100
    for r in range(first, first + users, per_record):
        events = []
        for u in range(r, min(r + per_record, first + users)):
            t = BASE + u * spacing_ms
            kinds = (("play", t), ("end", t + 1_000)) if end else (("play", t),)
            for kind, at in kinds:
                events.append(
                    Event(
                        event_id=f"{u:08x}-{kind[0]}000-4000-8000-{u:012x}",
                        timestamp=_EPOCH + timedelta(milliseconds=at),
                        user_id=f"user-{u:09d}",
                        track_id=f"spotify:track:{u % 9_999:022d}",
                        playback=Playback(0, 200_000),
                        event_type=kind,  # type: ignore[arg-type]
                        geo=Geo("US"),
                        device=Device(os="ios"),
                    )
                )
        yield RawBatch(received_at=NOW + r, events=events)


def _measure_users(users: int, keep_closed: bool) -> dict[str, Any]:
    kept: list[object] = []
    if keep_closed:
        emit = SessionTable._emit

        def emit_and_keep(self: SessionTable, s: Any, closed: list[Session]) -> None:
            kept.append(s)
            emit(self, s, closed)

        SessionTable._emit = emit_and_keep  # type: ignore[method-assign]
    # A short gap: sessions close a few seconds of event time after they end, so
    # only a few hundred are open at any moment.
    p = PartitionProcessor(
        0,
        ProcessingConfig(session_gap_ms=1_000, allowed_lateness_ms=LATENESS_MS),
        60_000,
        now_ms=NOW,
    )
    out = Outputs()
    gc.collect()
    start = _rss()
    began = time.monotonic()
    closed = 0
    for record in _records(users):
        p.process(0, record, NOW, out)
        closed += len(out.sessions)
        out.clear()
    p.tick(BASE + 10**12, (), out)
    closed += len(out.sessions)
    out.clear()
    return {
        "rss_start": start,
        "rss_end": _rss(),
        "ids": 2 * users,
        "closed": closed,
        "open": p.open_sessions,
        "buffered": p.buffered,
        "seconds": time.monotonic() - began,
    }


def _measure_ids(ids: int) -> dict[str, Any]:
    window = DedupWindow(86_400_000, ids)
    gc.collect()
    start = _rss()
    for record in _records(ids // 2):
        window.filter(record.received_at, record.events)
    assert len(window) == ids
    return {"bytes_per_id": (_rss() - start) / ids}


def _measure_sessions(sessions: int) -> dict[str, Any]:
    # No dedup memory to speak of (one id remembered): what stays is the sessions.
    p = PartitionProcessor(0, ProcessingConfig(dedup_max_ids=1), 60_000, now_ms=NOW)
    out = Outputs()
    gc.collect()
    start = _rss()
    for record in _records(sessions, spacing_ms=1, end=False):
        p.process(0, record, NOW, out)
        out.clear()
    # One event well after the others releases them all into sessions (the gap keeps
    # them open).
    for record in _records(1, first=sessions + 10_000, spacing_ms=1, end=False):
        p.process(0, record, NOW, out)
    assert p.open_sessions == sessions and out.sessions == []
    return {"bytes_per_session": (_rss() - start) / sessions}


def _measure_kept(sessions: int) -> dict[str, Any]:
    # Sessions of two events (play, end) closed by the watermark and kept for an
    # hour of lateness: what stays is the kept sessions.
    p = PartitionProcessor(
        0, ProcessingConfig(dedup_max_ids=1, session_gap_ms=1_000), 60_000, now_ms=NOW
    )
    out = Outputs()
    gc.collect()
    start = _rss()
    for record in _records(sessions, spacing_ms=1):
        p.process(0, record, NOW, out)
        out.clear()
    # One user's session 20 minutes of event time later closes them all (within the
    # hour, so they are kept).
    for record in _records(1, first=sessions + 1_200_000, spacing_ms=1):
        p.process(0, record, NOW, out)
    assert p.kept_sessions == sessions
    out.clear()
    return {"bytes_per_kept_session": (_rss() - start) / sessions}


def _child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _within(run: dict[str, Any], bytes_per_id: float) -> tuple[bool, str]:
    expected = run["rss_start"] + run["ids"] * bytes_per_id
    ok = abs(run["rss_end"] - expected) <= TOLERANCE * expected
    mib = 2**20
    return ok, (
        f"RSS at start-up {run['rss_start'] / mib:.1f} MiB + dedup window"
        f" {run['ids']:,} ids x {bytes_per_id:.1f} B = {expected / mib:.1f} MiB;"
        f" RSS after {run['rss_end'] / mib:.1f} MiB"
        f" ({run['seconds']:.1f} s for {run['ids'] // 2:,} users)"
    )


# Three children in turn, each bounded by CHILD_TIMEOUT_S: pytest's 120 s default for the
# whole test would cut it off first on a busy machine (it did, under a CPU hog).
@pytest.mark.timeout(3 * CHILD_TIMEOUT_S + 30)
def test_memory_after_a_million_users_is_start_up_plus_the_dedup_window() -> None:
    per_id = _child("ids", str(2 * USERS))["bytes_per_id"]
    per_session = _child("sessions", "100000")["bytes_per_session"]
    per_kept = _child("kept", "100000")["bytes_per_kept_session"]
    print(
        f"bytes per remembered id: {per_id:.1f}; bytes per open session: {per_session:.0f};"
        f" bytes per kept session (2 events): {per_kept:.0f}"
    )
    run = _child("users", str(USERS))
    ok, report = _within(run, per_id)
    print(report)
    assert (run["closed"], run["open"], run["buffered"]) == (USERS, 0, 0)
    assert ok, report


@pytest.mark.timeout(2 * CHILD_TIMEOUT_S + 30)
def test_negative_control_keeping_closed_sessions_fails_the_check() -> None:
    users = 200_000
    per_id = _child("ids", str(2 * users))["bytes_per_id"]
    run = _child("users", str(users), "--keep-closed")
    ok, report = _within(run, per_id)
    print(report)
    assert run["closed"] == users
    assert not ok, report


if __name__ == "__main__":
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "users":
        result = _measure_users(n, keep_closed="--keep-closed" in sys.argv)
    elif mode == "ids":
        result = _measure_ids(n)
    elif mode == "sessions":
        result = _measure_sessions(n)
    elif mode == "kept":
        result = _measure_kept(n)
    else:
        pytest.fail(f"unknown mode {mode!r}")
    print(json.dumps(result))


def test_kept_sessions_are_those_of_the_lateness() -> None:
    # Default lateness (an hour), users 10 ms apart, gap 1 s: a session is kept from
    # its close until the watermark passes its end + gap + an hour, so about 360,000
    # users' sessions at a time (plus a few out of order), never all of them.
    users = 500_000
    p = PartitionProcessor(0, ProcessingConfig(session_gap_ms=1_000), 60_000, now_ms=NOW)
    out = Outputs()
    peak = 0
    for n, record in enumerate(_records(users)):
        p.process(0, record, NOW, out)
        out.clear()
        if n % 100 == 0:
            peak = max(peak, p.kept_sessions)
    per_hour = 3_600_000 // 10
    assert per_hour * 0.95 <= peak <= per_hour * 1.05, peak
    p.tick(BASE + 10**12, (), out)
    assert (p.open_sessions, p.kept_sessions) == (0, 0)
