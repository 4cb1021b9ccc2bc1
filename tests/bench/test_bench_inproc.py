"""``python -m bench.inproc``: the in-process CPU-per-request measurement runs every mode."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60


@pytest.mark.parametrize(
    ("mode", "batch"), [("full", 1), ("full", 100), ("nolog", 1), ("canned", 1)]
)
def test_inproc_answers_every_request_and_prints_cpu_per_request(mode: str, batch: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.inproc", "--mode", mode, "--batch", str(batch),
         "--connections", "16", "--requests", "300"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert re.fullmatch(
        rf"batch {batch} mode {mode} fsync always: CPU per request user [\d.]+ µs"
        r" \+ system [\d.]+ µs = [\d.]+ µs; [\d,]+ requests/s",
        line,
    ), line


def test_inproc_stops_on_a_response_other_than_200() -> None:
    # A batch over the event limit is answered 413: the run must fail, not hang.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.inproc", "--batch", "20", "--requests", "10"],
        cwd=ROOT,
        env={**clean_env(), "EVD_LIMITS__MAX_EVENTS_PER_BATCH": "10"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert "unexpected response: b'HTTP/1.1 413" in proc.stderr
