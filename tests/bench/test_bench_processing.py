"""``python -m bench.processing``: the recorded input, evd's run, bytewax's run, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from evdtest import clean_env

from evd.core.config import ProcessingConfig
from evd.core.log import partition_for, records
from evd.core.schema import epoch_ms

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not installed (it runs from a checkout): import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import processing

pytestmark = pytest.mark.workers_independent

RUN_TIMEOUT_S = 100
HAVE_BYTEWAX = processing.bytewax_version() is not None
needs_bytewax = pytest.mark.skipif(
    not HAVE_BYTEWAX, reason="bytewax is not installed (pip install -e '.[bench]')"
)


def run_script(out: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        # 2,000 users at 10 events/s: the model plays at real pace, so no user has two
        # events in one millisecond (evd and bytewax order such ties differently).
        [sys.executable, "-m", "bench.processing", "--events", "6000", "--users", "2000",
         "--rate", "10",
         "--out", str(out), *extra],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False,
    )
    report = json.loads((out / "processing.json").read_text()) if proc.returncode != 2 else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def test_the_recorded_input_is_what_the_edge_writes() -> None:
    rec = processing.record(3_000, seed=5, users=400)
    again = processing.record(3_000, seed=5, users=400)
    other = processing.record(3_000, seed=6, users=400)
    assert rec.records == again.records, "the same seed must record the same bytes"
    assert rec.records != other.records
    seen = 0
    previous_arrival = 0
    bound = ProcessingConfig().max_out_of_orderness_ms
    newest: dict[int, int] = {}
    kinds = set()
    for p, payload in rec.records:
        assert records.header_of(payload, "raw").kind == records.Kind.RAW
        raw = records.decode(payload, "raw")
        assert 1 <= len(raw.events) <= 100
        assert raw.received_at >= previous_arrival, "records are appended in arrival order"
        previous_arrival = raw.received_at
        for ev in raw.events:
            assert partition_for(ev.user_id, rec.partitions) == p
            assert ev.track_id.startswith("spotify:track:") and len(ev.track_id) == 36
            assert ev.geo is not None and ev.device is not None
            t = epoch_ms(ev.timestamp)
            assert t <= raw.received_at
            assert newest.get(p, t) - t <= bound, "disorder beyond the 5 s bound"
            newest[p] = max(newest.get(p, t), t)
            kinds.add(ev.event_type)
        seen += len(raw.events)
    assert seen == rec.events == 3_000
    assert kinds == {"play", "pause", "resume", "seek", "skip", "end"}
    assert rec.stats["events_beyond_bound"] == 0
    assert len({p for p, _ in rec.records}) == rec.partitions


def test_without_bytewax_its_side_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(processing, "bytewax_version", lambda: None)
    rc = processing.main(["--events", "500", "--users", "100", "--engines", "bytewax",
                          "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "processing.json").read_text())
    assert "not installed" in report["bytewax"]["skipped"]
    assert "ratio" not in report
    assert "bytewax    skipped: bytewax is not installed" in capsys.readouterr().out


def test_a_run_in_a_child_returns_its_result_or_its_failure(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert processing.in_child(lambda: {"events_per_s": 1.5}) == {"events_per_s": 1.5}
    failed = processing.in_child(lambda: {"x": 1 // 0})
    assert failed == {"error": "the run failed (exit status 1); its traceback is on stderr"}
    assert "ZeroDivisionError" in capfd.readouterr().err


def test_bad_options_exit_2(tmp_path: Path) -> None:
    assert processing.main(["--engines", "flink", "--out", str(tmp_path)]) == 2


def test_evd_alone(tmp_path: Path) -> None:
    rc, report, output = run_script(tmp_path, "--engines", "evd", "--repeat", "2")
    assert rc == 0, output
    evd = report["evd"]
    assert len(evd["runs"]) == 2 and evd["events_per_s"] > 0
    # Nothing is late by construction, so every event ends up in a closed session.
    assert evd["late_events"] == 0
    assert evd["summary"]["event_count"] == 6000 == evd["emitted"]["events"]
    assert 0 < evd["summary"]["sessions"] < 6000
    assert evd["summary"]["users"] <= 2000
    assert set(evd["phase_shares"]) == {"decode", "process", "tick", "encode"}
    assert abs(sum(evd["phase_shares"].values()) - 1) < 0.01
    assert "bytewax" not in report and "ratio" not in report


@needs_bytewax
def test_against_bytewax_same_sessions(tmp_path: Path) -> None:
    rc, report, output = run_script(tmp_path, "--repeat", "1", "--profile", "--cpu", "0")
    assert rc == 0, output
    evd, bw = report["evd"], report["bytewax"]
    assert bw["events_per_s"] > 0 and bw["feed"] == "flat_map" and bw["batch"] == 1000
    assert report["ratio"] == pytest.approx(evd["events_per_s"] / bw["events_per_s"])
    assert evd["summary"] == bw["summary"], report["notes"]
    assert report["notes"] == [processing.SAME_SESSIONS]
    assert report["config"]["affinity"] == [0]
    assert "process" in report["evd_profile"]["top"]
    assert (tmp_path / "evd.prof").exists()
    assert "evd / bytewax:" in output


@needs_bytewax
def test_the_comparison_sees_a_difference() -> None:
    # Negative control: the same events (30 s of event time) with a 10 s gap give other sessions, and
    # the digest and the notes say so.
    from bench import bytewax_sessions

    rec = processing.record(3_000, seed=2, users=200)
    batches = processing.decoded_batches(rec, 1000)
    assert [len(b) for b in batches] == [1000, 1000, 1000]
    normal = bytewax_sessions.run(batches)
    short = bytewax_sessions.run(batches, gap_ms=10_000)
    a = processing._summary(normal.sessions)
    b = processing._summary(short.sessions)
    assert a["event_count"] == b["event_count"] == 3000
    assert b["sessions"] > a["sessions"]
    notes = processing.compare({"evd": {"summary": a}, "bytewax": {"summary": b}})
    assert any(n.startswith("sessions differs") for n in notes)
    assert "the sessions' fields differ (digest of every session)" in notes
    tied = processing.compare(
        {"input": {"user_time_ties": 3}, "evd": {"summary": a}, "bytewax": {"summary": b}}
    )
    assert tied[-1].startswith("3 events fall in the same millisecond")
