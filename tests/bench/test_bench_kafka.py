"""``python -m bench.kafka``: an edge pod and a process pod against the Tansu broker, a
paced load, the raw topic's records and the processor's rate read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.workers_independent


def test_a_paced_rate_goes_into_the_raw_topic_and_through_the_processor(tmp_path: Path) -> None:
    """What the benchmark measures and reports, not how fast this machine is: whether
    the processor keeps up with 2,000 events/s is the benchmark's verdict (a busy
    machine carries less; ``python -m bench.kafka --rates 2000 --process``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kafka", "--rates", "2000", "--batch", "20",
         "--connections", "4", "--duration", "4", "--warmup", "1", "--settle", "2",
         "--process", "--out", str(tmp_path)],
        cwd=ROOT, env=clean_env(), capture_output=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "into raw" in proc.stdout.decode()
    [result] = json.loads((tmp_path / "kafka.json").read_text())
    assert set(result["statuses"]) == {"200"}
    assert 0 < result["accepted_per_s"] <= 2200  # paced, not as fast as possible
    # A 20-event request from 20 users spans several of the 8 partitions: one
    # record per partition, never one per event.
    assert 1 < result["events_per_record"] < 20
    assert result["raw_records"] >= result["statuses"]["200"]  # at least one per request
    # The verdict follows from the lag reported with it (--lag-bound 2.0 by default).
    assert result["processor_kept_up"] is (result["processor_lag_seconds_at_end_of_load"] <= 2.0)
    assert result["processed_per_s"] > 0
    # Through the processor (all of it by now, on an idle machine).
    assert result["processed_total"] > 0
    assert result["broker_cpu_cores"] > 0 and result["server_cpu_cores"] > 0
