"""``python -m bench.versus`` (evd's default server against a FastAPI collector, per
CPU-second) and its peer ``bench/collector.py``, run as a user runs them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "tests" / "data" / "seed-event.json").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _post(port: int, body: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/events", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = _free_port()
    out = tmp_path / "events.ndjson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.collector", "--port", str(port), "--out", str(out)],
        cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the collector did not start"
                time.sleep(0.1)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_collector_validates_and_appends(collector: tuple[int, Path]) -> None:
    port, out = collector
    status, body = _post(port, f'{{"events": [{SEED}]}}')
    assert status == 200 and json.loads(body)["accepted"] == 1
    [line] = out.read_text().splitlines()
    assert json.loads(line)["event_id"] == json.loads(SEED)["event_id"]
    bad = json.loads(SEED) | {"track_id": "spotify:track:nope"}
    status, _ = _post(port, json.dumps({"events": [bad]}))
    assert status == 422
    assert len(out.read_text().splitlines()) == 1


def test_one_run_measures_both_servers_and_their_ratio(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.versus", "--duration", "1", "--runs", "1", "--batch", "10",
         "--connections", "4", "--drain-timeout", "60", "--out", str(tmp_path),
         "--baseline", str(ROOT)],  # this checkout as its own baseline: the option's plumbing
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "versus.json").read_text())
    [round_] = report["rounds"]
    for kind in ("evd", "collector", "baseline"):
        r = round_[kind]
        assert r["accepted"] > 0 and set(r["statuses"]) == {"200"}, r
        assert r["cpu_s"] > 0 and r["events_per_cpu_s"] > 0, r
    assert round_["evd"]["drained"]
    assert round_["ratio"] == pytest.approx(
        round_["evd"]["events_per_cpu_s"] / round_["collector"]["events_per_cpu_s"], rel=0.01
    )
    assert round_["baseline"]["drained"]
    assert 0 < round_["evd"]["events_per_s_drained"] <= round_["evd"]["events_per_s"]
    assert round_["vs_baseline"] == pytest.approx(
        round_["evd"]["events_per_cpu_s"] / round_["baseline"]["events_per_cpu_s"], rel=0.01
    )
    assert "evd / collector per CPU-second" in proc.stdout
    assert "evd / baseline per CPU-second" in proc.stdout
