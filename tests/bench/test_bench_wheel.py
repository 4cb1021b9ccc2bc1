"""``evd bench`` from an installed wheel, not from the source tree.

A wheel of the project is built offline, installed with ``--no-deps --no-index``
into a fresh venv outside the repository, and run from a directory outside it.
The dependencies come from this environment's site-packages through a .pth file
(a path entry, so this environment's own .pth files, the editable finder among
them, are not run): ``evd`` must then be the wheel's copy, and there is no
top-level ``bench`` to import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest
from evdtest import ServerFactory

from evd.bench.report import decode

ROOT = Path(__file__).resolve().parents[2]
#: Bounds each child process (build, install, probe, run); each takes a few seconds.
STEP_TIMEOUT_S = 120
#: What the wheel is built from: the sources setuptools reads, copied so that the
#: build leaves no build/ or egg-info in the checkout (nor packs a stale build/lib).
SOURCES = ("pyproject.toml", "README.md", "evd")


class Installed(NamedTuple):
    wheel: Path
    venv: Path
    site: Path


def _env() -> dict[str, str]:
    """os.environ without anything that points Python at other code (or EVD_* overrides)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EVD_") and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                      "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(argv: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=STEP_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          check=False)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", dist, src], cwd=tmp)
    (wheel,) = dist.glob("evd-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
          "--no-index", wheel], cwd=tmp)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "evd-test-deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return Installed(wheel, venv, site)


def test_wheel_holds_evd_and_its_bench_data_but_no_top_level_bench(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"evd", "evd-0.1.0.dist-info"}, tops
    assert "evd/bench/harness.py" in names and "evd/bench/data/seed-event.json" in names


def test_fresh_venv_imports_the_wheel_and_no_bench(installed: Installed, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json, evd, evd.bench.harness\n"
        "from importlib import resources\n"
        "seed = resources.files('evd.bench') / 'data' / 'seed-event.json'\n"
        "print(json.dumps({'evd': evd.__file__, 'bench': importlib.util.find_spec('bench')"
        " is not None, 'seed': json.loads(seed.read_text())['event_id']}))\n"
    )
    out = json.loads(_run([installed.venv / "bin" / "python", "-c", probe], cwd=tmp_path).stdout)
    assert Path(out["evd"]).resolve().is_relative_to(installed.site.resolve()), out
    assert not out["bench"]
    assert out["seed"] == json.loads((ROOT / "tests/data/seed-event.json").read_text())["event_id"]


def test_evd_bench_runs_from_the_wheel(installed: Installed, servers: ServerFactory,
                                       tmp_path: Path) -> None:
    server = servers.start(args=["--workers", "1"])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = _run([installed.venv / "bin" / "evd", "bench", "--target", server.url,
                 "--duration", "1", "--rate", "1000", "--batch", "50", "--out", "out",
                 "--no-progress", "--users", "2000", "--tracks", "500"], cwd=cwd)
    assert "evd bench: open loop, rate 1,000 ev/s, batch 50" in proc.stdout, proc.stdout
    r = decode((cwd / "out" / "report.json").read_bytes())
    assert r.status_counts == {"200": 20}
    assert r.totals.events_sent == 1000 and r.totals.batches_unsent == 0
    assert r.totals.events_accepted + r.totals.events_duplicate + r.totals.events_rejected == 1000
    assert r.server.available and r.server.accepted == r.totals.events_accepted > 0
    assert (cwd / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
