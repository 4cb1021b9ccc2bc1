"""The metrics layout: declared by the stages, sealed before the first scrape, alike in every process.

Each stage declares its own metrics when its metrics module is imported; the
layout orders them by name when it is sealed, so worker processes that
imported the stages in any order share their files. The checks that import
modules in a chosen order run in fresh interpreters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

import pytest

from evd.core.metrics.slots import Layout, LayoutError, Slots

STAGES = (
    "evd.edge.metrics",
    "evd.core.log.embedded.metrics",
    "evd.state.metrics",
    "evd.sinks.metrics",
)

#: Every family of a worker's /metrics (as before the stages declared their own).
FAMILIES = {
    "evd_audit_events_total", "evd_chart_rows_total", "evd_events_accepted_total",
    "evd_events_duplicates_total", "evd_events_received_total", "evd_events_rejected_total",
    "evd_http_connections", "evd_http_requests_total", "evd_kept_sessions",
    "evd_kept_sessions_sum", "evd_lake_late_rows_total",
    "evd_log_append_seconds", "evd_log_disk_bytes", "evd_log_disk_bytes_max",
    "evd_log_flush_bytes", "evd_log_fsync_seconds", "evd_log_pending_bytes",
    "evd_log_retention_freed_bytes_total", "evd_log_written_bytes_total", "evd_open_sessions",
    "evd_open_sessions_sum", "evd_processor_buffered_events",
    "evd_processor_buffered_events_sum", "evd_processor_duplicates_total",
    "evd_processor_events_total", "evd_processor_forced_total", "evd_processor_lag_bytes",
    "evd_processor_lag_bytes_sum", "evd_processor_lag_seconds", "evd_processor_lag_seconds_max",
    "evd_processor_late_total", "evd_ready", "evd_request_duration_seconds",
    "evd_sessions_closed_total", "evd_sink_batches_total", "evd_sink_dead_lettered_total",
    "evd_sink_delivered_total", "evd_sink_delivery_delay_seconds", "evd_sink_failed_total",
    "evd_sink_lag_bytes", "evd_sink_lag_seconds", "evd_sink_retries_total",
    "evd_sink_write_seconds", "evd_snapshots_total", "evd_worker_events_received_total",
    "evd_worker_requests_total", "evd_worker_restarts_total", "evd_worker_up",
}


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def layout_after(modules: Sequence[str]) -> object:
    """The layout of a fresh interpreter that imported ``modules`` in this order,
    then scraped (which seals it)."""
    imports = "; ".join(f"import {m}" for m in modules)
    done = run(
        f"{imports}\n"
        "import json\n"
        "from evd.core.metrics.exposition import render\n"
        "from evd.core.metrics.slots import seal\n"
        "render()\n"
        "s = seal()\n"
        "print(json.dumps([s.size, s.magic, s.places, s.float_slots, s.reset_slots]))\n"
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_layout_is_the_same_whichever_stage_is_imported_first() -> None:
    orders = [STAGES[i:] + STAGES[:i] for i in range(len(STAGES))] + [STAGES[::-1]]
    layouts = [layout_after(order) for order in orders]
    assert all(layout == layouts[0] for layout in layouts)
    # The worker imports the stages its own way, and lays its file out alike.
    assert layout_after(["evd.worker"]) == layouts[0]


def test_a_worker_reports_every_family() -> None:
    done = run(
        "import evd.worker\n"
        "from evd.core.metrics.exposition import render\n"
        "from evd.sinks.metrics import set_sinks\n"
        "set_sinks(['lake', 'audit'])\n"
        "print(render().decode())\n"
    )
    assert done.returncode == 0, done.stderr
    helps = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("# HELP")]
    assert set(helps) == FAMILIES
    assert helps == sorted(helps)


def test_a_declaration_after_sealing_is_refused() -> None:
    done = run(
        "from evd.core.metrics.kinds import Counter\n"
        "from evd.core.metrics.exposition import render\n"
        "render()\n"
        "Counter('evd_too_late', 'declared after the first scrape')\n"
    )
    assert done.returncode != 0
    assert "LayoutError: metric evd_too_late declared after the metrics layout was sealed" in (
        done.stderr
    )


def test_a_name_is_declared_once() -> None:
    done = run(
        "import evd.edge.metrics\n"
        "from evd.core.metrics.kinds import Counter\n"
        "Counter('evd_events_received', 'again')\n"
    )
    assert done.returncode != 0
    assert "LayoutError: metric evd_events_received declared twice" in done.stderr


class Declared:
    """A metric of ``size`` slots, the last one a double."""

    resets = False

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.float_slots = (size - 1,)
        self.first = 0

    def place(self, first: int) -> None:
        self.first = first


def test_sealing_orders_by_name_and_keeps_what_was_counted() -> None:
    slots = Slots(1)
    layout = Layout(slots)
    b, a = Declared("b", 2), Declared("a", 3)
    layout.declare(b)
    layout.declare(a)
    assert (b.first, a.first) == (1, 3)
    slots.counts[b.first] = 7
    slots.floats[b.first + 1] = 0.5
    slots.counts[a.first + 1] = 9
    sealed = layout.seal()
    assert (a.first, b.first) == (1, 4)
    assert sealed.size == slots.size == 6
    assert sealed.float_slots == (3, 5)
    assert slots.counts[0] == sealed.magic
    assert slots.counts[b.first] == 7
    assert slots.floats[b.first + 1] == 0.5
    assert slots.counts[a.first + 1] == 9
    assert layout.seal() is sealed
    with pytest.raises(LayoutError, match="declared after the metrics layout was sealed"):
        layout.declare(Declared("c", 1))
