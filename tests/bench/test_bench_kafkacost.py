"""``python -m bench.kafkacost``: an edge, a process and a deliver pod against the Tansu
broker, a closed-loop load, every stage drained, each pod's CPU per event."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.workers_independent


def test_every_pod_is_costed_and_every_accepted_event_reaches_the_warehouse(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kafkacost", "--runs", "1", "--batch", "20",
         "--connections", "4", "--duration", "2", "--idle", "0.5", "--drain-timeout", "60",
         "--out", str(tmp_path)],
        cwd=ROOT, env=clean_env(), capture_output=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "events per CPU-second" in proc.stdout.decode()
    report = json.loads((tmp_path / "kafkacost.json").read_text())
    [r] = report["rounds"]
    assert set(r["statuses"]) == {"200"}
    assert r["drained"] is True
    # The edge's count, not fewer than the answers the load counted before its end.
    assert r["accepted"] >= r["answered_in_load"] > 0
    # The deliver pod put every accepted event into the warehouse, once.
    assert r["warehouse_events"] == r["accepted"]
    assert r["stages_at_end"]["processed"] >= r["accepted"]
    assert set(r["pods"]) == {"edge", "process", "deliver"}
    for pod in r["pods"].values():
        assert pod["cpu_s"] > 0
        assert pod["events_per_cpu_s"] == pytest.approx(r["accepted"] / pod["cpu_s"], rel=0.01)
    total = sum(pod["cpu_s"] for pod in r["pods"].values())
    assert r["all_pods"]["cpu_s"] == pytest.approx(total, abs=0.01)
    assert r["all_pods"]["events_per_cpu_s"] < min(
        pod["events_per_cpu_s"] for pod in r["pods"].values())
    assert set(report["median_events_per_cpu_s"]) == {"edge", "process", "deliver", "all_pods"}
