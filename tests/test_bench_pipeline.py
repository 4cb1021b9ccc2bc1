"""``python -m bench.pipeline``: a real server, a paced load, the lag read from /metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[1]


def test_a_paced_rate_is_accepted_processed_and_reported(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--rates", "3000", "--batch", "10",
         "--connections", "4", "--duration", "3", "--warmup", "1", "--settle", "2",
         "--out", str(tmp_path)],
        cwd=ROOT, env=clean_env(), capture_output=True, timeout=90, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "highest sustained" in proc.stdout.decode()
    [result] = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["statuses"] == {"200": result["statuses"]["200"]}
    assert 2000 <= result["accepted_per_s"] <= 3300  # paced, not as fast as possible
    assert result["sustained"] is True
    last = result["samples"][-1]
    # Stamped with the wall clock: processed, not routed to late.
    assert last["processed"] == last["accepted"] > 0
    assert last["late"] == 0
