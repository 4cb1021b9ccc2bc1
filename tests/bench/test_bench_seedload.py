"""``python -m bench.seedload`` (the lean one-core load) against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from importlib import resources
from pathlib import Path

from evdtest import ServerFactory, clean_env

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 60


def seedload(url: str, *extra: str) -> tuple[int, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.seedload", "--target", url, "--json", *extra],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def accepted_total(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("evd_events_accepted_total "):
                return float(line.split()[1])
    raise AssertionError("no evd_events_accepted_total in /metrics")


def test_every_event_it_sends_is_new_and_accepted(servers: ServerFactory) -> None:
    server = servers.start()
    rc, first = seedload(server.url, "--batch", "10", "--connections", "4", "--duration", "1")
    rc2, second = seedload(server.url, "--batch", "10", "--connections", "4", "--duration", "1")
    assert (rc, rc2) == (0, 0)
    sent = 0
    for result in (first, second):
        statuses = result["statuses"]
        assert isinstance(statuses, dict) and set(statuses) == {"200"}
        sent += statuses["200"] * 10
        assert result["events_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
    # Ids are stamped per request and differ between runs: nothing is a duplicate.
    assert accepted_total(server.url) == sent


def test_refusals_are_reported_and_fail_the_run(servers: ServerFactory) -> None:
    server = servers.start()
    rc, result = seedload(
        server.url, "--api-key", "wrong", "--connections", "2", "--duration", "0.5"
    )
    assert rc == 1
    statuses = result["statuses"]
    assert isinstance(statuses, dict) and set(statuses) == {"401"}


def test_its_seed_event_is_the_one_in_tests_data() -> None:
    # seedload reads the copy shipped as evd.bench package data; it must not drift.
    shipped = resources.files("evd.bench") / "data" / "seed-event.json"
    assert shipped.read_bytes() == (ROOT / "tests" / "data" / "seed-event.json").read_bytes()
