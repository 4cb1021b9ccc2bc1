"""``python -m bench.delivery``: the default server's delivery loops behind sinks that
write nothing, on a recorded log, backlog and live; every loop reads and delivers
every item, and the lake and the warehouse decode each record once between them."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from evdtest import clean_env

from evd.core.log import records
from evd.sinks import rows

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not installed (it runs from a checkout): import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import delivery

pytestmark = pytest.mark.workers_independent


@pytest.mark.timeout(180)
def test_the_loops_deliver_every_item_backlog_and_live(tmp_path: Path) -> None:
    appends, weights = delivery.record_appends(2_000, 100)
    assert sum(weights) == 2_000
    cache = tmp_path / "input.pkl"
    cache.write_bytes(pickle.dumps((appends, weights)))
    items = {
        stream: sum(rows.count_items(s, records.decode(p, s)) for s, _, p in appends if s == stream)
        for stream in ("events", "sessions", "charts")
    }
    assert items["events"] == 2_000 and items["sessions"] > 0 and items["charts"] > 0
    out = tmp_path / "delivery.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.delivery", "--events", "2000", "--batch", "100",
         "--repeat", "1", "--rate", "20000", "--input-cache", str(cache), "--json", str(out)],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"backlog", "live", "feed"}
    for mode in ("backlog", "live"):
        run = report["runs"][mode][0]
        assert run["cpu_seconds"] > 0
        # The sinks' loops deliver every item of their streams; the audit counts
        # each raw record and every event of the events records.
        assert run["delivered"]["lake"] == run["delivered"]["warehouse"] == sum(items.values())
        assert run["delivered"]["audit"] == sum(1 for s, _, _ in appends if s == "raw") + 2_000
        assert report["summary"][mode]["median_us_per_event"] > 0
    # Live, the two sinks read each record while the other's decode is there.
    shared = report["runs"]["live"][0]["shared_decodes"]
    assert shared["hits"] == shared["misses"] > 0
    assert "µs of CPU per event" in proc.stdout
