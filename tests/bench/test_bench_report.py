"""The bench report: schema, merging, spike/recovery analysis, HTML rendering.

The measurements here are synthetic (recorded through the driver's own
bookkeeping with chosen times), so every number the report derives is known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from screenshot import color_counts, hex_rgb, near, read_png, screenshot

from evd.bench import html, metrics
from evd.bench.driver import BodySource, Driver
from evd.bench.plan import RunPlan, Spike, my_batches
from evd.bench.report import (
    SCHEMA_VERSION,
    Report,
    ServerScrapes,
    build_report,
    decode,
    encode,
    summary_text,
)
from evd.bench.traffic import TrafficConfig

START_MS = 1_717_243_200_000
BASE_LAT = 0.004
SPIKE_LAT = 0.2
BACKLOG_LAT = 0.15
BACKLOG_END = 5.5

METRICS_BEFORE = """\
# TYPE evd_events_received_total counter
evd_events_received_total 1000.0
# TYPE evd_events_accepted_total counter
evd_events_accepted_total 990.0
# TYPE evd_events_duplicates_total counter
evd_events_duplicates_total 10.0
# TYPE evd_events_rejected_total counter
evd_events_rejected_total{reason="invalid"} 0.0
# TYPE evd_request_duration_seconds histogram
evd_request_duration_seconds_bucket{le="0.001"} 5.0
evd_request_duration_seconds_bucket{le="0.01"} 10.0
evd_request_duration_seconds_bucket{le="0.1"} 10.0
evd_request_duration_seconds_bucket{le="+Inf"} 10.0
evd_request_duration_seconds_count 10.0
evd_request_duration_seconds_sum 0.02
"""

METRICS_AFTER = """\
# TYPE evd_events_received_total counter
evd_events_received_total 11000.0
# TYPE evd_events_accepted_total counter
evd_events_accepted_total 10890.0
# TYPE evd_events_duplicates_total counter
evd_events_duplicates_total 110.0
# TYPE evd_events_rejected_total counter
evd_events_rejected_total{reason="invalid"} 7.0
evd_events_rejected_total{reason="rate_limited"} 400.0
# TYPE evd_request_duration_seconds histogram
evd_request_duration_seconds_bucket{le="0.001"} 5.0
evd_request_duration_seconds_bucket{le="0.01"} 100.0
evd_request_duration_seconds_bucket{le="0.1"} 110.0
evd_request_duration_seconds_bucket{le="+Inf"} 110.0
evd_request_duration_seconds_count 110.0
evd_request_duration_seconds_sum 0.5
"""

DELAY = """\
# TYPE evd_sink_delivery_delay_seconds histogram
evd_sink_delivery_delay_seconds_bucket{{le="0.1"}} {a}
evd_sink_delivery_delay_seconds_bucket{{le="1.0"}} {b}
evd_sink_delivery_delay_seconds_bucket{{le="+Inf"}} {b}
evd_sink_delivery_delay_seconds_count {b}
evd_sink_delivery_delay_seconds_sum 1.0
"""

LAG = """\
# TYPE evd_processor_lag_seconds_max gauge
evd_processor_lag_seconds_max {p}
# TYPE evd_sink_lag_seconds gauge
evd_sink_lag_seconds{{sink="lake"}} {lake}
evd_sink_lag_seconds{{sink="warehouse"}} {wh}
"""


def _plan(spike: bool = True) -> RunPlan:
    return RunPlan(
        target="http://127.0.0.1:9", api_key="k", duration_s=10.0, rate=1000.0, batch=100,
        procs=1, connections=4, gzip=False, timeout_s=5.0, interval_s=1.0,
        traffic=TrafficConfig(seed=1, users=5_000, tracks=1_000),
        spike=Spike(at_s=3.0, duration_s=2.0, factor=8.0) if spike else None)


def _synthetic_result(plan: RunPlan, server_error_at: float | None = None) -> dict[str, Any]:
    """Record a run through the driver's bookkeeping with known latencies and statuses."""
    driver = Driver(plan, 0, queue=None)  # type: ignore[arg-type]
    driver.t0 = 0.0
    source = BodySource(plan, 0, START_MS)
    for j in range(5):
        source.body(START_MS + j * 100, False)
    ack = orjson.dumps({"accepted": 98, "duplicates": 1, "rejected": [
        {"index": 7, "event_id": "e7", "error": "track_id: not a spotify:track id"}]})
    for j, off in my_batches(plan, 0):
        if off >= plan.duration_s:
            break
        phase = plan.phase_of(off)
        driver.batches_scheduled += 1
        driver.batches_sent += 1
        driver.events_sent += plan.batch
        driver.sched_lag.record(50)
        driver.send_lag.record(80)
        driver._interval(off).sent_events += plan.batch
        if server_error_at is not None and abs(off - server_error_at) < 1e-9:
            driver._record("500", plan.batch, off, off + BASE_LAT, phase, b"{}", None)
        elif phase == "spike" and j % 2:
            driver._record("429", plan.batch, off, off + BASE_LAT, phase, b"", 1.0)
        elif phase == "spike":
            driver._record("200", plan.batch, off, off + SPIKE_LAT, phase, ack, None)
        elif phase == "after" and off < BACKLOG_END:
            driver._record("200", plan.batch, off, off + BACKLOG_LAT, phase, ack, None)
        else:
            driver._record("200", plan.batch, off, off + BASE_LAT, phase, ack, None)
    return driver.result(source, cpu_s=1.5, start_delta_s=0.01)


def _scrapes(delay: bool, lag: bool = False) -> ServerScrapes:
    before = METRICS_BEFORE + (DELAY.format(a=0, b=0) if delay else "")
    after = METRICS_AFTER + (DELAY.format(a=900, b=1000) if delay else "")
    mid = METRICS_BEFORE.replace("evd_events_accepted_total 990.0",
                                 "evd_events_accepted_total 5990.0")
    if lag:
        mid += LAG.format(p=3.0, lake=9.5, wh=0.25)
        after += LAG.format(p=0.0, lake=2.0, wh=0.0)
    return ServerScrapes(before=metrics.parse(before), after=metrics.parse(after),
                         during=[(5.0, metrics.parse(mid)), (10.0, metrics.parse(after))])


def _report(spike: bool = True, delay: bool = False,
            server_error_at: float | None = None, lag: bool = False) -> Report:
    plan = _plan(spike)
    return build_report(plan, [_synthetic_result(plan, server_error_at)], _scrapes(delay, lag),
                        "2024-06-01T12:00:00.000Z", 2, "3.11", "synthetic")


def test_report_json_round_trips_through_its_schema(tmp_path: Path) -> None:
    report = _report()
    path = tmp_path / "report.json"
    path.write_bytes(encode(report))
    again = decode(path.read_bytes())
    assert again == report
    raw = orjson.loads(path.read_bytes())
    assert raw["schema_version"] == SCHEMA_VERSION
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "count"):
        assert key in raw["latency"]
    assert raw["latency_histogram"]["buckets"], "the HDR histogram itself is in the report"
    assert len(raw["series"]) == 10
    assert {"offered_events_per_s", "accepted_events_per_s", "p99_ms", "status"} <= set(
        raw["series"][0])
    assert raw["server"]["delivery_delay"]["available"] is False
    # Negative control: the schema really is enforced.
    del raw["totals"]["events_sent"]
    with pytest.raises(msgspec.ValidationError, match="events_sent"):
        decode(orjson.dumps(raw))
    raw["totals"]["events_sent"] = "many"
    with pytest.raises(msgspec.ValidationError):
        decode(orjson.dumps(raw))


def test_totals_latency_and_server_deltas() -> None:
    r = _report()
    batches = _plan().total_batches()
    assert r.totals.batches_sent == batches == r.latency.count
    assert r.status_counts["200"] + r.status_counts["429"] == batches
    assert r.latency.p50_ms == pytest.approx(BASE_LAT * 1000, rel=0.01)
    assert r.latency.max_ms == pytest.approx(SPIKE_LAT * 1000, rel=0.01)
    assert r.reject_reasons == {"track_id: not a spotify:track id": r.status_counts["200"]}
    assert r.events_by_status["429"] == 100 * r.status_counts["429"]
    assert r.server.available
    assert r.server.accepted == 9900.0 and r.server.duplicates == 100.0
    assert r.server.rejected_by_reason == {"invalid": 7.0, "rate_limited": 400.0}
    assert r.server.request_duration is not None and r.server.request_duration.count == 100
    assert r.server.series[0].accepted_events_per_s == 1000.0
    assert r.generator is not None and r.generator.events == 500
    assert r.series[3].offered_events_per_s == 8000.0
    assert r.series[0].offered_events_per_s == 1000.0


def test_spike_shedding_and_recovery_are_measured() -> None:
    r = _report()
    sp = r.spike
    assert sp is not None
    assert sp.base_rate == 1000.0 and sp.spike_rate == 8000.0
    assert sp.requests_during == 160 and sp.shed_during == 80
    assert sp.shed_fraction_during == 0.5
    assert sp.other_5xx == 0 and sp.only_expected_statuses
    assert sp.retry_after is not None and sp.retry_after.min_s == 1.0
    assert sp.baseline_p99_ms == pytest.approx(BASE_LAT * 1000, rel=0.01)
    # Backlog latency lasts until 5.5 s (+0.15 s): interval [5, 6) is unhealthy,
    # from 6 s on everything is back to baseline.
    assert sp.recovered and sp.recovery_s == 1.0
    before = next(p for p in r.phases if p.name == "before")
    assert before.shed_fraction == 0.0 and before.offered_events_per_s == 1000.0
    text = summary_text(r)
    assert "shed 80/160 requests (50.0%)" in text and "recovered 1s after" in text


def test_server_errors_other_than_503_are_flagged() -> None:
    r = _report(server_error_at=0.5)
    assert r.unexpected_5xx == 1
    assert r.spike is not None
    assert r.spike.other_5xx == 1 and not r.spike.only_expected_statuses
    assert any("5xx other than 503" in n for n in r.notes)


def test_delivery_delay_is_reported_only_when_the_server_has_it() -> None:
    without = _report(spike=False)
    assert not without.server.delivery_delay.available
    assert "not available" in without.server.delivery_delay.note
    assert without.spike is None and [p.name for p in without.phases] == ["steady"]
    with_delay = _report(spike=False, delay=True)
    d = with_delay.server.delivery_delay
    assert d.available and d.count == 1000
    assert d.p50_ms is not None and 0 < d.p50_ms <= 100
    assert d.p99_ms is not None and 100 < d.p99_ms <= 1000


def test_each_stages_lag_is_read_from_every_scrape() -> None:
    r = _report(lag=True)
    assert [p.lag_seconds for p in r.server.series] == [
        {"processor": 3.0, "lake": 9.5, "warehouse": 0.25},
        {"processor": 0.0, "lake": 2.0, "warehouse": 0.0},
    ]
    assert all(p.lag_seconds == {} for p in _report().server.series)


def test_a_report_written_before_stage_lags_still_decodes() -> None:
    report = _report()
    raw = orjson.loads(encode(report))
    for point in raw["server"]["series"]:
        del point["lag_seconds"]
    assert decode(orjson.dumps(raw)) == report


def test_the_lag_chart_is_drawn_only_when_the_server_reports_lag() -> None:
    page = html.render(_report(lag=True))
    assert 'aria-label="Lag of each stage"' in page
    chart = page[page.index('aria-label="Lag of each stage"'):]
    chart = chart[:chart.index("</svg>")]
    # One line per stage, the processor first, each named in the legend.
    assert chart.count("<polyline") == 3
    labels = [chart.index(f">{stage}</text>") for stage in ("processor", "lake", "warehouse")]
    assert labels == sorted(labels)
    assert "lake: max 9.5, at the last scrape 2" in page
    # Negative control: a server without lag gauges gets no empty chart.
    plain = html.render(_report())
    assert "Lag of each stage" not in plain and "lag of each stage" not in plain


def test_html_report_is_self_contained() -> None:
    page = html.render(_report())
    # Nothing for the browser to fetch.
    for needle in ("<script", "<link", "src=", "href=", "url(", "@import"):
        assert needle not in page, needle
    assert page.count("<svg") >= 5


def test_html_report_renders_its_charts_in_chromium(browser: str, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    path.write_text(html.render(_report(lag=True)), encoding="utf-8")
    png = tmp_path / "shot.png"
    screenshot(path, png, tmp_path / "profile")
    width, height, rows = read_png(png)
    assert (width, height) == (1280, 2000)
    counts = color_counts(rows)
    total = sum(counts.values())
    # Not blank: many colors, and a good share of the page is not background.
    assert len(counts) > 50
    background = counts.most_common(1)[0][1]
    assert background < 0.9 * total
    # The charts drew: line colors of the throughput and latency charts, the
    # orange of the 429 bar and the spike shading are all on the page.
    for color in (html.COLORS[0], html.COLORS[1], html.COLORS[3], "#fde2c8"):
        assert near(counts, hex_rgb(color)) > 20, color


SINK_DELAY = """\
# TYPE evd_sink_delivery_delay_seconds histogram
evd_sink_delivery_delay_seconds_bucket{{sink="lake",le="0.1"}} {a}
evd_sink_delivery_delay_seconds_bucket{{sink="lake",le="1.0"}} {b}
evd_sink_delivery_delay_seconds_bucket{{sink="lake",le="+Inf"}} {b}
evd_sink_delivery_delay_seconds_bucket{{sink="warehouse",le="0.1"}} {c}
evd_sink_delivery_delay_seconds_bucket{{sink="warehouse",le="1.0"}} {c}
evd_sink_delivery_delay_seconds_bucket{{sink="warehouse",le="+Inf"}} {c}
"""


def test_delivery_delay_is_reported_per_sink() -> None:
    # 1,000 events delivered to each of two sinks: 2,000 deliveries over both, which
    # the per-sink lines tell apart (the lake's mostly above 100 ms, the warehouse's under).
    plan = _plan(spike=False)
    scrapes = ServerScrapes(
        before=metrics.parse(METRICS_BEFORE + SINK_DELAY.format(a=0, b=0, c=0)),
        after=metrics.parse(METRICS_AFTER + SINK_DELAY.format(a=100, b=1000, c=1000)),
        during=[],
    )
    r = build_report(plan, [_synthetic_result(plan)], scrapes,
                     "2024-06-01T12:00:00.000Z", 2, "3.11", "synthetic")
    assert r.server.delivery_delay.count == 2000
    assert "every sink" in r.server.delivery_delay.note
    by_sink = r.server.delivery_delay_by_sink
    assert sorted(by_sink) == ["lake", "warehouse"]
    assert by_sink["lake"].count == by_sink["warehouse"].count == 1000
    lake_p50, wh_p99 = by_sink["lake"].p50_ms, by_sink["warehouse"].p99_ms
    assert lake_p50 is not None and lake_p50 > 100
    assert wh_p99 is not None and wh_p99 <= 100
    text = summary_text(r)
    assert "delivery  lake: p50" in text and "delivery  warehouse: p50" in text
    assert "(1,000 events)" in text
