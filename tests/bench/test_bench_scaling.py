"""``python -m bench.scaling`` (the workers-per-core curve): its decisions, and a real run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from evdtest import clean_env

ROOT = Path(__file__).resolve().parents[2]
# bench/ is not installed (it runs from a checkout): import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scaling import (
    Placement,
    RunResult,
    connections_for,
    curves,
    diagnose,
    format_cpu_list,
    parse_cpu_list,
    parse_fsync_list,
    parse_int_list,
    plan_placements,
    split,
)

RUN_TIMEOUT_S = 90

# -- core lists -----------------------------------------------------------------------


def test_cpu_lists_parse_like_taskset() -> None:
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5]
    assert parse_cpu_list("3,1,1-2") == [1, 2, 3]
    assert parse_cpu_list(" 12 - 15 ") == [12, 13, 14, 15]


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1,,2", "-1", "1-", "0-x"])
def test_bad_cpu_lists_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(bad)


def test_cpu_lists_format_shortest() -> None:
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_cpu_list([3]) == "3"
    assert format_cpu_list([]) == ""
    for text in ("0-15", "0,2,4", "1-3,12-15"):
        assert format_cpu_list(parse_cpu_list(text)) == text


def test_number_lists() -> None:
    assert parse_int_list("12,1,2,4,8,2", "--workers") == [1, 2, 4, 8, 12]
    for bad in ("", "0,1", "x", "1,-2"):
        with pytest.raises(ValueError, match="--workers"):
            parse_int_list(bad, "--workers")
    assert parse_fsync_list("always,never,always") == ["always", "never"]
    with pytest.raises(ValueError):
        parse_fsync_list("sometimes")


# -- where the workers and the generator run ----------------------------------------------


def test_sixteen_cores_put_the_generator_on_what_the_largest_count_leaves() -> None:
    placements, notes = plan_placements([1, 2, 4, 8, 12], list(range(16)))
    assert notes == []
    assert [p.workers for p in placements] == [1, 2, 4, 8, 12]
    for p in placements:
        assert p.server_cores == tuple(range(p.workers))
        assert p.gen_cores == (12, 13, 14, 15)  # the same for every count: comparable
        assert not p.shared


def test_the_affinity_mask_is_respected() -> None:
    placements, _ = plan_placements([1, 4], [4, 5, 6, 7, 8, 9])
    assert [(p.server_cores, p.gen_cores) for p in placements] == [
        ((4,), (8, 9)), ((4, 5, 6, 7), (8, 9))]


def test_two_cores_run_what_fits_and_flag_the_shared_generator() -> None:
    placements, notes = plan_placements([1, 2, 4, 8, 12], [0, 1])
    assert placements == [Placement(1, (0,), (1,)), Placement(2, (0, 1), (0, 1))]
    assert not placements[0].shared and placements[1].shared
    assert sum("skipped" in n for n in notes) == 3
    assert any("2 workers" in n and "shares" in n for n in notes)


def test_a_count_that_leaves_no_core_shares_them_all() -> None:
    placements, _ = plan_placements([1, 2, 4, 8, 12], list(range(12)))
    by_n = {p.workers: p for p in placements}
    assert by_n[8].gen_cores == (8, 9, 10, 11) and not by_n[8].shared
    assert by_n[12].gen_cores == tuple(range(12)) and by_n[12].shared
    one, _ = plan_placements([1], [0])
    assert one == [Placement(1, (0,), (0,))] and one[0].shared


def test_explicit_generator_cores() -> None:
    placements, notes = plan_placements([2, 16], list(range(16)), [12, 13, 14, 15])
    assert placements[0] == Placement(2, (0, 1), (12, 13, 14, 15))
    assert placements[1].server_cores == tuple(range(16)) and placements[1].shared
    assert any("16 workers" in n for n in notes)
    low, _ = plan_placements([2], list(range(8)), [0, 1])
    assert low[0].server_cores == (2, 3)  # the workers avoid the generator's cores
    with pytest.raises(ValueError, match="--gen-cores 20"):
        plan_placements([1], list(range(16)), [20])


def test_connections_grow_with_the_workers() -> None:
    assert connections_for(1, 1) == 256 and connections_for(1, 12) == 3072
    assert connections_for(100, 8) == 512
    assert connections_for(100, 3, per_worker=10) == 30
    assert split(10, 4) == [3, 3, 2, 2]
    assert split(2, 4) == [1, 1]  # never an empty generator process
    assert sum(split(3072, 4)) == 3072


# -- curves and checks -----------------------------------------------------------------------


def _run(workers: int, eps: float, batch: int = 100, **kw: object) -> RunResult:
    r = RunResult("always", batch, workers, format_cpu_list(range(workers)), "12-15",
                  False, 4, 64 * workers, events_per_s=eps, requests_per_s=eps / batch,
                  server_cpu_cores=float(workers), gen_cpu_cores=1.0)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_ratios_and_the_linear_check() -> None:
    base = 200_000.0
    (curve,) = curves([_run(1, base), _run(2, 2 * base), _run(4, 3.3 * base),
                       _run(8, 6.4 * base), _run(12, 7 * base)])
    ratios = {p.workers: (p.ratio, p.meets) for p in curve.points}
    assert ratios == {1: (1.0, None), 2: (2.0, True), 4: (3.3, True), 8: (6.4, True),
                      12: (7.0, None)}  # above 8 workers: reported, not checked
    assert curve.linear_check.startswith("met")
    (short,) = curves([_run(1, base), _run(8, 6.3 * base)])
    assert short.points[1].meets is False and short.linear_check.startswith("not met at 8")


def test_median_of_repeats_and_failed_runs_left_out() -> None:
    runs = [_run(1, 100.0), _run(1, 300.0), _run(1, 200.0), _run(2, 500.0),
            _run(2, 0.0, error="evd exited with status 2")]
    (curve,) = curves(runs)
    assert [(p.workers, p.events_per_s) for p in curve.points] == [(1, 200.0), (2, 500.0)]
    assert curve.points[0].runs == [100.0, 300.0, 200.0]
    assert curve.points[1].ratio == 2.5


def test_the_median_is_of_the_quiet_runs_when_there_are_any() -> None:
    runs = [_run(1, 100.0), _run(1, 90.0, other_cpu_cores=0.8), _run(1, 80.0, stolen_cpu_cores=0.5),
            _run(2, 150.0, other_cpu_cores=0.9), _run(2, 140.0, other_cpu_cores=0.3)]
    (curve,) = curves(runs)
    one, two = curve.points
    assert one.events_per_s == 100.0 and one.quiet == [True, False, False]
    assert two.events_per_s == 140.0 and two.quiet == [False, False]  # none quiet: all count


def test_without_a_one_worker_run_ratios_are_per_worker() -> None:
    (curve,) = curves([_run(2, 400.0), _run(4, 600.0)])
    assert [p.ratio for p in curve.points] == [2.0, 3.0]
    assert "no 1-worker run" in curve.linear_check


def test_curves_are_kept_apart_by_batch_and_fsync() -> None:
    runs = [_run(1, 10.0, batch=1), _run(1, 100.0), _run(1, 150.0, fsync="never")]
    assert [(c.fsync, c.batch) for c in curves(runs)] == [
        ("always", 1), ("always", 100), ("never", 100)]


def test_flags_say_what_limited_a_run() -> None:
    assert diagnose(_run(4, 1.0, gen_cpu_cores=3.8)) == ["generator busy (3.80 of 4 cores)"]
    assert diagnose(_run(4, 1.0, server_cpu_cores=2.0)) == ["workers not busy (2.00 of 4 cores)"]
    flags = diagnose(_run(2, 1.0, shared=True, gen_cores="0-1", statuses={"200": 5, "503": 1},
                          other_cpu_cores=0.5))
    assert flags[0] == "generator shares the workers' cores"
    assert not any("busy" in f for f in flags)  # 2 + 1 cores' worth of CPU fill the 2 cores
    assert any(f.startswith("machine not quiet") for f in flags)
    assert any("503" in f for f in flags)
    idle = diagnose(_run(2, 1.0, shared=True, gen_cores="0-1", server_cpu_cores=1.0,
                         gen_cpu_cores=0.4))
    assert idle[1] == "cores not busy (workers and generator 1.40 of 2)"
    assert diagnose(_run(1, 0.0, error="boom")) == ["failed"]


# -- real runs -----------------------------------------------------------------------------------


def scaling(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.scaling", "--out", str(out), *extra],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        check=False)


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_short_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    # A relative --out: the servers run elsewhere, their paths must still hold.
    proc = scaling(Path(os.path.relpath(out, ROOT)), "--workers", "1", "--batches", "5", "--fsync", "never",
                   "--duration", "0.6", "--warmup", "0.2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "scaling.json").read_text())
    (run,) = report["runs"]
    assert run["error"] is None and run["workers"] == 1 and run["batch"] == 5
    assert run["server_exit"] == 0
    assert set(run["statuses"]) == {"200"}
    # Every 200 accepted all 5 events: nothing was a duplicate.
    assert run["accepted"] == 5 * run["statuses"]["200"]
    assert run["events_per_s"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
    assert run["server_cpu_cores"] > 0 and run["gen_cpu_cores"] > 0
    (curve,) = report["curves"]
    assert curve["points"][0]["ratio"] == 1.0
    md = (out / "scaling.md").read_text()
    assert "## fsync: never, batch 5" in md and "| 1 |" in md
    assert "## fsync: never, batch 5" in proc.stdout
    # The server's log is kept, its data directory is not, and nothing it started is left.
    assert (out / "logs" / "never-b5-w1.log").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["logs", "scaling.json", "scaling.md"]
    assert processes_mentioning(str(out)) == []


def test_a_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    proc = scaling(out, "--workers", "1", "--batches", "1", "--fsync", "always",
                   "--duration", "0.5", "--evd", f"{sys.executable} -c 'raise SystemExit(3)'")
    assert proc.returncode == 1
    (run,) = json.loads((out / "scaling.json").read_text())["runs"]
    assert "evd exited with status 3" in run["error"]
    assert "FAILED" in proc.stdout


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """A child started meanwhile takes SIGINT as Ctrl-C, whoever started pytest.

    A process inherits an ignored SIGINT (``pytest &`` from a script ignores it), and
    Python then never raises KeyboardInterrupt: bench.scaling would run to its end
    and exit 0. A handler, unlike SIG_IGN, is reset to the default at exec.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_interrupting_it_stops_the_server(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    with open(tmp_path / "output.txt", "wb") as output, sigint_not_ignored():
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scaling", "--out", str(out), "--workers", "1",
             "--batches", "1", "--fsync", "never", "--duration", "30"],
            cwd=ROOT, env=clean_env(), stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        log = out / "logs" / "never-b1-w1.log"
        while not (log.is_file() and "evd listening" in log.read_text(errors="replace")):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # the load is running
        assert processes_mentioning(str(out))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(STOP_WAIT_S) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert processes_mentioning(str(out)) == []
    assert "interrupted" in json.loads((out / "scaling.json").read_text())["notes"][-1]


STOP_WAIT_S = 40
