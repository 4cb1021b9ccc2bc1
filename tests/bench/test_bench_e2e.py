"""``evd bench`` against a real ``evd serve`` process on 127.0.0.1 (short runs).

Each run is a few seconds at a few thousand events/s; the server counts what it
accepted, rejected and deduplicated, and the harness's numbers must agree with
the traffic model's (every invalid event rejected, every retry a duplicate).
Those counts hold only for a server that has seen no other run's events (the
model's ids depend on its seed alone), so every run here has a server of its own.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
from evdtest import ServerFactory, clean_env
from screenshot import color_counts, hex_rgb, near, read_png, screenshot

from evd.bench.harness import main
from evd.bench.report import Report, decode
from evd.bench.traffic import TrafficConfig, write_stream

# Bounds a whole CLI run (spawn + setup + run + drain); a healthy one takes ~5 s.
RUN_TIMEOUT_S = 90
#: A bound on a hang: the processors drop the duplicates the edge let through.
DROPPED_WITHIN_S = 60
EXPECTED = {"200", "429", "503"}


def _start(servers: ServerFactory) -> str:
    """A fresh unlimited server (one worker); its base URL."""
    return servers.start(args=["--workers", "1"]).url


def _args(url: str, out: Path, *extra: str) -> list[str]:
    return ["--target", url, "--api-key", "evd-dev-key", "--out", str(out), "--no-progress",
            "--users", "20000", "--tracks", "5000", *extra]


def _load(out: Path) -> Report:
    return decode((out / "report.json").read_bytes())


def _assert_every_event_accounted(r: Report, url: str) -> None:
    t = r.totals
    assert r.generator is not None
    assert t.batches_unsent == 0
    assert t.events_accepted + t.events_duplicate + t.events_rejected == t.events_sent
    # The server rejects exactly the events the model broke, and reports its
    # retries as duplicates: all of them, but for a retry sent while the original
    # was still in flight on another connection, which the edge cannot know yet
    # (more of them the slower the server answers): appended again, the processor's
    # dedup drops it. Together they drop every duplicate the model made.
    assert t.events_rejected == r.generator.invalid
    assert 0 <= t.events_duplicate <= r.generator.duplicates
    _wait_for_duplicates_dropped(url, r.generator.duplicates)
    assert r.server.available and r.server.accepted == t.events_accepted


def _wait_for_duplicates_dropped(url: str, duplicates: int) -> None:
    deadline = time.monotonic() + DROPPED_WITHIN_S
    while (dropped := _duplicates_dropped(url)) < duplicates:
        assert time.monotonic() < deadline, f"{dropped} of {duplicates} duplicates dropped"
        time.sleep(0.2)
    assert dropped == duplicates


def _duplicates_dropped(url: str) -> float:
    """Duplicates the edge reported plus those the processors dropped."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        lines = resp.read().decode().splitlines()
    names = ("evd_events_duplicates_total ", "evd_processor_duplicates_total ")
    return sum(float(line.split()[1]) for line in lines if line.startswith(names))


def _server_has_delivery_delay(url: str) -> bool:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return b"evd_sink_delivery_delay_seconds" in resp.read()


class CliRun(NamedTuple):
    url: str
    out: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def cli_run(module_servers: ServerFactory,
            tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """One ``evd bench`` run in a child process against a server of its own; the tests
    below check its summary and report, and render its HTML in a browser."""
    url = _start(module_servers)
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "evd", "bench", *_args(url, out, "--duration", "3",
                                                      "--rate", "2000", "--batch", "50")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=clean_env(),
        stdin=subprocess.DEVNULL, check=False)
    return CliRun(url, out, proc)


def test_cli_run_prints_summary_and_writes_reports(cli_run: CliRun) -> None:
    proc, out = cli_run.proc, cli_run.out
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "evd bench: open loop, rate 2,000 ev/s, batch 50" in proc.stdout
    assert "latency   p50" in proc.stdout and "report.html" in proc.stdout
    r = _load(out)
    assert r.meta.mode == "open" and r.meta.procs >= 1
    assert r.status_counts == {"200": 120}
    assert r.totals.events_sent == 6000
    _assert_every_event_accounted(r, cli_run.url)
    assert r.latency.count == 120 and 0 < r.latency.p50_ms <= r.latency.p99_ms
    assert len(r.series) >= 3 and sum(p.accepted_events_per_s for p in r.series) > 0
    assert r.server.request_duration is not None
    if not _server_has_delivery_delay(cli_run.url):
        assert not r.server.delivery_delay.available
        assert "not available" in r.server.delivery_delay.note
        assert "delivery  not available" in proc.stdout


def test_cli_run_report_renders_in_chromium(cli_run: CliRun, browser: str,
                                            tmp_path: Path) -> None:
    assert cli_run.proc.returncode == 0, cli_run.proc.stdout + cli_run.proc.stderr
    png = tmp_path / "shot.png"
    screenshot(cli_run.out / "report.html", png, tmp_path / "profile")
    _, _, rows = read_png(png)
    counts = color_counts(rows)
    assert len(counts) > 50
    assert counts.most_common(1)[0][1] < 0.9 * sum(counts.values())
    assert near(counts, hex_rgb("#2ca02c")) > 20  # accepted line and the 200 bar


def test_replay_of_a_generated_stream(servers: ServerFactory, tmp_path: Path) -> None:
    url = _start(servers)
    stream = tmp_path / "stream.ndjson.gz"
    stats = write_stream(stream, TrafficConfig(seed=21, users=20_000, tracks=5_000), 3000,
                         1000.0, 1_717_243_200_000)
    out = tmp_path / "out"
    rc = main(_args(url, out, "--replay", str(stream), "--rebase", "--rate", "3000",
                    "--duration", "3", "--batch", "100"))
    assert rc == 0
    r = _load(out)
    assert r.meta.replay == str(stream)
    assert r.totals.events_sent == 3000 and r.status_counts == {"200": 30}
    assert r.totals.events_rejected == stats["invalid"]
    assert r.totals.events_accepted == 3000 - stats["invalid"] - r.totals.events_duplicate
    # The edge reports the retries whose original it had committed; one sent while
    # the original was still in flight is appended again, and the processor's
    # dedup drops it: together they drop every duplicate of the stream.
    assert r.totals.events_duplicate <= stats["duplicates"]
    _wait_for_duplicates_dropped(url, stats["duplicates"])


def test_closed_loop_with_gzip(servers: ServerFactory, tmp_path: Path) -> None:
    url = _start(servers)
    out = tmp_path / "out"
    rc = main(_args(url, out, "--rate", "max", "--gzip", "--duration", "2",
                    "--connections", "4", "--batch", "100", "--procs", "2"))
    assert rc == 0
    r = _load(out)
    assert r.meta.mode == "closed" and r.meta.gzip
    assert set(r.status_counts) == {"200"}
    assert r.totals.events_sent > 1000
    _assert_every_event_accounted(r, url)


SPIKE = ["--rate", "1000", "--batch", "50", "--duration", "5", "--spike-at", "1",
         "--spike-duration", "1", "--spike-factor", "8", "--interval", "0.5"]


def test_spike_is_shed_with_429_and_recovers(servers: ServerFactory, tmp_path: Path) -> None:
    # The edge alone (no sinks): recovery is the rate limiter's and the edge's, timed to
    # 1.5 s; sinks writing the spike's events on the same core of a 2-core machine
    # once took longer (their cost: README, Performance).
    limited = servers.start({"limits": {"rate_limit_events_per_s": 2000,
                                        "rate_limit_burst": 2000}, "sinks": []},
                            args=["--workers", "1"])
    out = tmp_path / "out"
    assert main(_args(limited.url, out, *SPIKE)) == 0
    r = _load(out)
    sp = r.spike
    assert sp is not None
    assert sp.base_rate == 1000 and sp.spike_rate == 8000
    assert set(r.status_counts) <= EXPECTED, r.status_counts
    assert sp.other_5xx == 0 and sp.only_expected_statuses
    # 8,000 ev/s offered against 2,000 ev/s (+ a 2,000 burst) for 1 s: most is shed.
    assert sp.shed_during > 0.3 * sp.requests_during
    assert sp.retry_after is not None and sp.retry_after.min_s > 0
    before = next(p for p in r.phases if p.name == "before")
    assert before.shed_fraction == 0.0
    assert sp.recovered and sp.recovery_s is not None and sp.recovery_s <= 1.5
    html = (out / "report.html").read_text()
    assert "<h2>Spike</h2>" in html and "recovery" in html


def test_spike_against_an_unlimited_server_sheds_nothing(servers: ServerFactory,
                                                         tmp_path: Path) -> None:
    """Negative control for the spike test: without a limit nothing is shed."""
    url = _start(servers)
    out = tmp_path / "out"
    assert main(_args(url, out, *SPIKE)) == 0
    r = _load(out)
    assert r.spike is not None
    assert r.spike.shed_during == 0 and r.status_counts.keys() == {"200"}
