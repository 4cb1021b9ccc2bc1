"""``python -m bench.sinks``: the recorded output streams, each sink timed alone and
behind the delivery loop, and every item counted where the sink put it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from evdtest import clean_env

from evd.core.log import records

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not installed (it runs from a checkout): import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import sinks

pytestmark = pytest.mark.workers_independent

SINKS = ["files-gzip", "files-zstd", "parquet", "sqlite", "stdout-devnull"]
STREAMS = ["events", "sessions", "charts"]


def test_the_recording_is_the_processors_output_of_every_event() -> None:
    rec = sinks.record_outputs(2_000, users=300)
    assert rec.events == 2_000
    assert rec.stats["events"]["items"] == 2_000  # no duplicates, nothing late
    assert rec.stats["sessions"]["items"] > 0 and rec.stats["charts"]["items"] > 0
    ids = [ev.event_id for _, r in rec.streams["events"] for ev in records.decode(r, "events").events]
    assert len(set(ids)) == 2_000
    # Records carry their raw origin, as the delivery loop's replay check needs.
    first = records.decode(rec.streams["events"][0][1], "events")
    assert first.raw_offset >= 0


def test_batches_close_at_the_item_or_byte_bound_like_the_loop() -> None:
    rec = sinks.record_outputs(2_000, users=300)
    recs = rec.streams["events"]

    def decode(stream: str, payload: bytes) -> object:
        return records.decode(payload, stream)

    by_items = sinks.cut_batches(recs, "events", decode, 500, 1 << 30)
    assert sum(b.count for b in by_items) == 2_000
    # A batch closes with the record that reaches the bound (it may overshoot by one record).
    assert all(500 <= b.count < 500 + 100 for b in by_items[:-1])
    assert all(len(b.values) == len(b.partitions) for b in by_items)
    by_bytes = sinks.cut_batches(recs, "events", decode, 10**9, 50_000)
    assert all(b.nbytes >= 50_000 for b in by_bytes[:-1])
    assert sum(b.count for b in by_bytes) == 2_000


def run_script(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sinks", "--events", "3000", "--users", "300",
         "--batch", "1000", "--repeat", "1", "--out", str(out), *extra],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=110, check=False,
    )
    report = json.loads((out / "sinks.json").read_text()) if proc.returncode != 2 else {}
    return proc, report


@pytest.mark.timeout(180)
def test_each_sink_alone_and_behind_the_loop_writes_every_item(tmp_path: Path) -> None:
    proc, report = run_script(tmp_path, "--sinks", ",".join(SINKS), "--streams",
                              ",".join(STREAMS), "--loop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = {s: report["input"][s]["items"] for s in STREAMS}
    assert items["events"] == 3000
    names = [*SINKS, *(f"{s} (loop)" for s in [*SINKS, "null"])]
    assert list(report["sinks"]) == names
    for name in names:
        r = report["sinks"][name]
        assert r["events_per_s"] > 0 and r["seconds"] > 0, name
        assert len(r["runs"]) == 1
        assert r["items"] == items, name
        if name.startswith(("stdout", "null")):
            assert r["landed"] is None
        else:
            # Every item is in the lake's files or the warehouse's tables.
            assert r["landed"] == items, name
        if name.endswith("(loop)"):
            assert r["delivered"] == sum(items.values()) and r["dead_lettered"] == 0
        else:
            assert r["writes"]["events"] == 3
            assert set(r["phases_s"]) == {"start", "flush", "close",
                                         *(f"write {s}" for s in STREAMS)}
    assert report["sinks"]["sqlite"]["target"] == 150_000
    assert report["loop_overhead_us_per_event"] > 0
    out = proc.stdout
    assert "events/s" in out and "delivery loop alone" in out
    assert out.count("\n") >= len(names)


def test_items_missing_where_the_sink_wrote_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Negative control for the landed check: one row short is reported and exits 1.
    real = sinks.landed

    def short(spec: str, root: Path, streams: list[str]) -> dict[str, int] | None:
        found = real(spec, root, streams)
        assert found is not None
        return {**found, "events": found["events"] - 1}

    monkeypatch.setattr(sinks, "landed", short)
    code = sinks.main(["--events", "1000", "--users", "200", "--repeat", "1", "--in-process",
                       "--sinks", "sqlite", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "sinks.json").read_text())
    assert report["sinks"]["sqlite"]["landed"] == {"events": 999}


def test_bad_options_exit_2(tmp_path: Path) -> None:
    proc, _ = run_script(tmp_path, "--sinks", "kafka")
    assert proc.returncode == 2 and "kafka" in proc.stderr
