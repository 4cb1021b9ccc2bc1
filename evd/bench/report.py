"""The run report: its schema, how it is built from measurements, and the text summary.

The JSON file is ``msgspec.json.encode(Report)``; decoding it with
``msgspec.json.decode(data, type=Report)`` validates it against this schema.
Latencies are in milliseconds, rates in events (or requests) per second, times
as seconds from the start of the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from evd.bench.histogram import Histogram
from evd.bench.metrics import (
    ACCEPTED,
    DELIVERY_DELAY,
    DUPLICATES,
    RECEIVED,
    REJECTED,
    REQUEST_DURATION,
    Samples,
    buckets,
    counter_delta,
    delta_buckets,
    label_delta,
    label_values,
    quantile,
    stage_lags,
    total,
)
from evd.bench.plan import RunPlan, Spike

SCHEMA_VERSION = "evd-bench-report/1"
SHED_STATUSES = ("429", "503")
# Recovery: after the spike, the first interval from which RECOVERY_HOLD
# consecutive intervals (or all that remain) are healthy again.
RECOVERY_HOLD = 3


class Percentiles(msgspec.Struct, forbid_unknown_fields=True):
    """Latency summary in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class RetryAfter(msgspec.Struct, forbid_unknown_fields=True):
    """``Retry-After`` values seen on 429/503 responses, in seconds."""

    count: int
    min_s: float
    max_s: float
    mean_s: float


class SeriesPoint(msgspec.Struct, forbid_unknown_fields=True):
    """One interval of the run, by response completion time."""

    t_s: float
    offered_events_per_s: float | None
    sent_events_per_s: float
    completed_requests_per_s: float
    accepted_events_per_s: float
    shed_requests_per_s: float
    error_requests_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    status: dict[str, int]


class ServerPoint(msgspec.Struct, forbid_unknown_fields=True):
    """Server counters between two scrapes of ``/metrics``."""

    t_s: float
    received_events_per_s: float | None
    accepted_events_per_s: float | None
    #: Lag in seconds of each stage at this scrape: ``processor`` and each sink by
    #: name (empty: the server reports none; reports written before it have none).
    lag_seconds: dict[str, float] = {}


class PhaseStats(msgspec.Struct, forbid_unknown_fields=True):
    """Requests whose scheduled send time fell in one phase of the run."""

    name: str
    start_s: float
    end_s: float
    offered_events_per_s: float | None
    requests: int
    events: int
    status: dict[str, int]
    shed_fraction: float
    latency: Percentiles
    retry_after: RetryAfter | None


class SpikeReport(msgspec.Struct, forbid_unknown_fields=True):
    """How the server shed the album-drop spike and how fast it recovered."""

    at_s: float
    end_s: float
    factor: float
    base_rate: float
    spike_rate: float
    requests_during: int
    shed_during: int
    shed_fraction_during: float
    status_during: dict[str, int]
    other_5xx: int
    """5xx responses other than 503 in the whole run (should be 0)."""
    only_expected_statuses: bool
    """Every response was 200, 429 or 503 (errors without a response count against it)."""
    retry_after: RetryAfter | None
    baseline_p99_ms: float
    baseline_shed_fraction: float
    recovered: bool
    recovery_s: float | None
    recovery_rule: str


class DelayReport(msgspec.Struct, forbid_unknown_fields=True):
    """End-to-end delay, event received to delivered to a sink (server histogram)."""

    available: bool
    note: str
    count: int = 0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None


class ServerLatency(msgspec.Struct, forbid_unknown_fields=True):
    """Server-side request duration quantiles (from its histogram buckets)."""

    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


class ServerReport(msgspec.Struct, forbid_unknown_fields=True):
    """What the server's own metrics say about this run (deltas over the run)."""

    available: bool
    note: str | None
    received: float | None
    accepted: float | None
    duplicates: float | None
    rejected_by_reason: dict[str, float]
    request_duration: ServerLatency | None
    #: Over every sink: an event counts once per sink that delivered it.
    delivery_delay: DelayReport
    series: list[ServerPoint]
    #: The same, per sink (by its name).
    delivery_delay_by_sink: dict[str, DelayReport] = msgspec.field(default_factory=dict)


class Totals(msgspec.Struct, forbid_unknown_fields=True):
    """Counts over the whole run and the rates they give."""

    duration_s: float
    batches_scheduled: int
    batches_sent: int
    batches_unsent: int
    events_sent: int
    requests_completed: int
    events_accepted: int
    events_duplicate: int
    events_rejected: int
    offered_events_per_s: float | None
    sent_events_per_s: float
    accepted_events_per_s: float
    requests_per_s: float


class GeneratorReport(msgspec.Struct, forbid_unknown_fields=True):
    """What the traffic model produced (summed over processes)."""

    events: int
    duplicates: int
    invalid: int
    late: int
    compressed: int
    stretched: int
    sessions: int
    pace: float
    by_type: dict[str, int]
    invalid_kinds: dict[str, int]


class ClientReport(msgspec.Struct, forbid_unknown_fields=True):
    """Health of the load generator itself."""

    procs: int
    cpu_s: list[float]
    generate_s: list[float]
    """Wall time each process spent building bodies during the run."""
    pregenerate_s: list[float]
    """Wall time each process spent building bodies before the start."""
    connects: int
    schedule_lag: Percentiles
    """How late the scheduler created each batch (CPU-starved generator)."""
    send_lag: Percentiles
    """Schedule to bytes on the wire (includes waiting for a free connection)."""
    start_skew_s: float


class Meta(msgspec.Struct, forbid_unknown_fields=True):
    """How the run was set up."""

    tool: str
    started_at: str
    target: str
    mode: str
    rate: float | None
    batch: int
    duration_s: float
    procs: int
    connections_per_proc: int
    gzip: bool
    timeout_s: float
    interval_s: float
    seed: int
    replay: str | None
    pregenerated: bool
    spike: Spike | None
    cpus: int
    python: str
    title: str


class Report(msgspec.Struct, forbid_unknown_fields=True):
    """A whole run; this is the schema of ``report.json``."""

    schema_version: str
    meta: Meta
    totals: Totals
    latency: Percentiles
    latency_histogram: dict[str, Any]
    latency_spectrum: list[tuple[float, float]]
    status_counts: dict[str, int]
    events_by_status: dict[str, int]
    errors: dict[str, int]
    retry_after: RetryAfter | None
    reject_reasons: dict[str, int]
    unexpected_5xx: int
    series: list[SeriesPoint]
    phases: list[PhaseStats]
    spike: SpikeReport | None
    server: ServerReport
    generator: GeneratorReport | None
    client: ClientReport
    notes: list[str]


# ------------------------------------------------------------------ helpers
def percentiles_of(h: Histogram) -> Percentiles:
    """Summarize a microsecond histogram in milliseconds."""
    p = h.percentiles([50, 90, 99, 99.9])
    return Percentiles(
        count=h.total, mean_ms=round(h.mean() / 1000, 3),
        p50_ms=p["p50"] / 1000, p90_ms=p["p90"] / 1000, p99_ms=p["p99"] / 1000,
        p999_ms=p["p99.9"] / 1000, max_ms=h.max / 1000,
    )


def _retry_after(h: Histogram) -> RetryAfter | None:
    if h.total == 0:
        return None
    return RetryAfter(count=h.total, min_s=h.min / 1000, max_s=h.max / 1000,
                      mean_s=round(h.mean() / 1000, 3))


def _add(into: dict[str, int], other: Mapping[str, int]) -> None:
    for k, v in other.items():
        into[k] = into.get(k, 0) + v


def _shed(status: Mapping[str, int]) -> int:
    return sum(status.get(s, 0) for s in SHED_STATUSES)


def _other_5xx(status: Mapping[str, int]) -> int:
    return sum(v for k, v in status.items() if k.isdigit() and k.startswith("5") and k != "503")


def _errors(status: Mapping[str, int]) -> int:
    return sum(v for k, v in status.items() if not k.isdigit())


class ServerScrapes(msgspec.Struct):
    """Scrapes of /metrics: before the run, during it (t_s, samples) and after."""

    before: Samples | None = None
    after: Samples | None = None
    during: list[tuple[float, Samples]] = []
    error: str | None = None


def _server_report(scrapes: ServerScrapes) -> ServerReport:
    before, after = scrapes.before, scrapes.after
    missing_delay = DelayReport(
        available=False,
        note=f"not available: the server exposes no {DELIVERY_DELAY} histogram "
             "(no sink reports delivery yet)")
    if after is None:
        return ServerReport(available=False,
                            note=scrapes.error or "metrics were not scraped",
                            received=None, accepted=None, duplicates=None,
                            rejected_by_reason={}, request_duration=None,
                            delivery_delay=DelayReport(
                                available=False, note="not available: no metrics"),
                            series=[])
    req_b = delta_buckets(buckets(after, REQUEST_DURATION),
                          buckets(before, REQUEST_DURATION) if before else [])
    request_duration = None
    if req_b:
        request_duration = ServerLatency(
            count=int(req_b[-1][1]), **{
                f"p{name}_ms": (None if (v := quantile(q, req_b)) is None else round(v * 1000, 3))
                for name, q in (("50", 0.5), ("90", 0.9), ("99", 0.99))})
    delay = _delay(after, before, "over every sink (an event counts once per sink)") \
        if buckets(after, DELIVERY_DELAY) else missing_delay
    by_sink = {
        sink: _delay(after, before, f"sink {sink}", sink=sink)
        for sink in label_values(after, DELIVERY_DELAY, "sink")
    }
    series = []
    prev_t, prev = 0.0, before
    for t, samples in scrapes.during:
        span = t - prev_t
        if span > 0 and prev is not None:
            rec = counter_delta(samples, prev, RECEIVED)
            acc = counter_delta(samples, prev, ACCEPTED)
            series.append(ServerPoint(
                t_s=round(t, 3),
                received_events_per_s=None if rec is None else round(rec / span, 1),
                accepted_events_per_s=None if acc is None else round(acc / span, 1),
                lag_seconds=stage_lags(samples)))
        prev_t, prev = t, samples
    known = total(after, ACCEPTED) is not None or total(after, RECEIVED) is not None
    return ServerReport(
        available=True,
        note=None if known else "the server's metrics lack the evd_events_* counters",
        received=counter_delta(after, before, RECEIVED),
        accepted=counter_delta(after, before, ACCEPTED),
        duplicates=counter_delta(after, before, DUPLICATES),
        rejected_by_reason=label_delta(after, before, REJECTED, "reason"),
        request_duration=request_duration,
        delivery_delay=delay,
        series=series,
        delivery_delay_by_sink=by_sink,
    )


def _delay(after: Samples, before: Samples | None, what: str, **labels: str) -> DelayReport:
    """The delivery delay of the sinks matching ``labels`` over the run."""
    d = delta_buckets(buckets(after, DELIVERY_DELAY, **labels),
                      buckets(before, DELIVERY_DELAY, **labels) if before else [])
    count = int(d[-1][1]) if d else 0
    if count == 0:
        return DelayReport(available=False,
                           note="not available: no event was delivered during the run")
    vals = {name: quantile(q, d) for name, q in
            (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999))}
    return DelayReport(available=True, note=f"from the server's {DELIVERY_DELAY}, {what}",
                       count=count, **{k: None if v is None else round(v * 1000, 3)
                                       for k, v in vals.items()})


def _recovery(plan: RunPlan, spike: Spike, series: Sequence[SeriesPoint],
              baseline_p99: float, baseline_shed: float) -> tuple[bool, float | None, str]:
    p99_limit = max(2.0 * baseline_p99, baseline_p99 + 20.0)
    shed_limit = max(0.01, 2.0 * baseline_shed)
    rule = (f"first interval after the spike from which {RECOVERY_HOLD} consecutive intervals "
            f"have p99 <= {p99_limit:.1f} ms (2x baseline, at least +20 ms), "
            f"shed+errors <= {shed_limit:.1%} of responses, and at least one response")

    def healthy(pt: SeriesPoint) -> bool:
        done = pt.completed_requests_per_s
        if done <= 0:
            return False
        bad = (pt.shed_requests_per_s + pt.error_requests_per_s) / done
        return pt.p99_ms <= p99_limit and bad <= shed_limit

    first = next((i for i, pt in enumerate(series) if pt.t_s + 1e-9 >= spike.end_s), None)
    if first is None:
        return False, None, rule
    for i in range(first, len(series)):
        window = series[i:i + RECOVERY_HOLD]
        if window and all(healthy(pt) for pt in window):
            return True, round(max(0.0, series[i].t_s - spike.end_s), 3), rule
    return False, None, rule


# ----------------------------------------------------------------- building
def build_report(plan: RunPlan, results: Sequence[Mapping[str, Any]], scrapes: ServerScrapes,
                 started_at: str, cpus: int, python: str, title: str) -> Report:
    """Merge the processes' results and the server's metrics into one report."""
    latency = Histogram()
    send_lag = Histogram()
    sched_lag = Histogram()
    retry_after = Histogram()
    status: dict[str, int] = {}
    events_by_status: dict[str, int] = {}
    errors: dict[str, int] = {}
    reasons: dict[str, int] = {}
    n_intervals = max((len(r["intervals"]) for r in results), default=0)
    iv_hist = [Histogram() for _ in range(n_intervals)]
    iv_status: list[dict[str, int]] = [{} for _ in range(n_intervals)]
    iv_sent = [0] * n_intervals
    iv_done = [0] * n_intervals
    iv_accepted = [0] * n_intervals
    phases: dict[str, dict[str, Any]] = {}
    gen: dict[str, Any] | None = None
    for r in results:
        latency.merge(Histogram.from_dict(r["latency"]))
        send_lag.merge(Histogram.from_dict(r["send_lag"]))
        sched_lag.merge(Histogram.from_dict(r["sched_lag"]))
        retry_after.merge(Histogram.from_dict(r["retry_after"]))
        _add(status, r["status"])
        _add(events_by_status, r["events_by_status"])
        _add(errors, r["errors"])
        _add(reasons, r["reasons"])
        for i, iv in enumerate(r["intervals"]):
            iv_hist[i].merge(Histogram.from_dict(iv["lat"]))
            _add(iv_status[i], iv["status"])
            iv_sent[i] += iv["sent_events"]
            iv_done[i] += iv["done"]
            iv_accepted[i] += iv["accepted"]
        for name, ph in r["phases"].items():
            agg = phases.setdefault(name, {"requests": 0, "events": 0, "status": {},
                                           "lat": Histogram(), "retry_after": Histogram()})
            agg["requests"] += ph["requests"]
            agg["events"] += ph["events"]
            _add(agg["status"], ph["status"])
            agg["lat"].merge(Histogram.from_dict(ph["lat"]))
            agg["retry_after"].merge(Histogram.from_dict(ph["retry_after"]))
        g = r.get("generator")
        if g:
            if gen is None:
                gen = {"events": 0, "duplicates": 0, "invalid": 0, "late": 0, "compressed": 0,
                       "stretched": 0, "sessions": 0, "pace": g.get("pace", 1.0), "by_type": {},
                       "invalid_kinds": {}}
            for key in ("events", "duplicates", "invalid", "late", "compressed", "stretched",
                        "sessions"):
                gen[key] += g[key]
            gen["pace"] = min(gen["pace"], g.get("pace", 1.0))
            _add(gen["by_type"], g["by_type"])
            _add(gen["invalid_kinds"], g["invalid_kinds"])

    iv_s = plan.interval_s
    series = []
    for i in range(n_intervals):
        t = i * iv_s
        offered = None
        if plan.rate is not None:
            end = min(t + iv_s, plan.duration_s)
            offered = round((plan.events_until(end) - plan.events_until(min(t, end))) / iv_s, 1)
        pct = iv_hist[i].percentiles([50, 99])
        series.append(SeriesPoint(
            t_s=round(t, 3), offered_events_per_s=offered,
            sent_events_per_s=round(iv_sent[i] / iv_s, 1),
            completed_requests_per_s=round(iv_done[i] / iv_s, 2),
            accepted_events_per_s=round(iv_accepted[i] / iv_s, 1),
            shed_requests_per_s=round(_shed(iv_status[i]) / iv_s, 2),
            error_requests_per_s=round(_errors(iv_status[i]) / iv_s, 2),
            p50_ms=pct["p50"] / 1000, p99_ms=pct["p99"] / 1000, max_ms=iv_hist[i].max / 1000,
            status=iv_status[i]))

    phase_list = []
    bounds = {"steady": (0.0, plan.duration_s)}
    if plan.spike is not None:
        bounds = {"before": (0.0, plan.spike.at_s),
                  "spike": (plan.spike.at_s, plan.spike.end_s),
                  "after": (plan.spike.end_s, plan.duration_s)}
    for name, (start, end) in bounds.items():
        agg = phases.get(name, {"requests": 0, "events": 0, "status": {},
                                "lat": Histogram(), "retry_after": Histogram()})
        offered = None
        if plan.rate is not None and end > start:
            offered = round((plan.events_until(end) - plan.events_until(start)) / (end - start), 1)
        reqs = agg["requests"]
        phase_list.append(PhaseStats(
            name=name, start_s=start, end_s=end, offered_events_per_s=offered,
            requests=reqs, events=agg["events"], status=agg["status"],
            shed_fraction=round(_shed(agg["status"]) / reqs, 4) if reqs else 0.0,
            latency=percentiles_of(agg["lat"]), retry_after=_retry_after(agg["retry_after"])))

    spike_report = None
    other_5xx = _other_5xx(status)
    if plan.spike is not None and plan.rate is not None:
        sp = plan.spike
        before = next(p for p in phase_list if p.name == "before")
        during = next(p for p in phase_list if p.name == "spike")
        # Baseline from the pre-spike phase, skipping the first interval (connects).
        base_pts = [pt for pt in series if iv_s <= pt.t_s and pt.t_s + iv_s <= sp.at_s]
        base_p99 = max((pt.p99_ms for pt in base_pts), default=before.latency.p99_ms)
        base_shed = before.shed_fraction
        recovered, recovery_s, rule = _recovery(plan, sp, series, base_p99, base_shed)
        unexpected = sum(v for k, v in status.items() if k not in ("200", "429", "503"))
        spike_report = SpikeReport(
            at_s=sp.at_s, end_s=sp.end_s, factor=sp.factor, base_rate=plan.rate,
            spike_rate=plan.rate * sp.factor, requests_during=during.requests,
            shed_during=_shed(during.status), shed_fraction_during=during.shed_fraction,
            status_during=during.status, other_5xx=other_5xx,
            only_expected_statuses=unexpected == 0,
            retry_after=during.retry_after, baseline_p99_ms=base_p99,
            baseline_shed_fraction=base_shed, recovered=recovered, recovery_s=recovery_s,
            recovery_rule=rule)

    batches_scheduled = sum(r["batches_scheduled"] for r in results)
    batches_sent = sum(r["batches_sent"] for r in results)
    batches_unsent = sum(r["batches_unsent"] for r in results)
    events_sent = sum(r["events_sent"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    dur = plan.duration_s
    totals = Totals(
        duration_s=dur, batches_scheduled=batches_scheduled, batches_sent=batches_sent,
        batches_unsent=batches_unsent, events_sent=events_sent,
        requests_completed=latency.total, events_accepted=accepted,
        events_duplicate=sum(r["duplicates"] for r in results),
        events_rejected=sum(r["rejected"] for r in results),
        offered_events_per_s=(round(plan.events_until(dur) / dur, 1)
                              if plan.rate is not None else None),
        sent_events_per_s=round(events_sent / dur, 1),
        accepted_events_per_s=round(accepted / dur, 1),
        requests_per_s=round(latency.total / dur, 1))

    client = ClientReport(
        procs=plan.procs, cpu_s=[round(r["cpu_s"], 3) for r in results],
        generate_s=[round(r["gen_s"], 3) for r in results],
        pregenerate_s=[round(r.get("pregen_s", 0.0), 3) for r in results],
        connects=sum(r["connects"] for r in results),
        schedule_lag=percentiles_of(sched_lag), send_lag=percentiles_of(send_lag),
        start_skew_s=round(max((abs(r["start_delta_s"]) for r in results), default=0.0), 3))

    generator = GeneratorReport(**gen) if gen is not None else None
    server = _server_report(scrapes)
    report = Report(
        schema_version=SCHEMA_VERSION,
        meta=Meta(tool="evd bench", started_at=started_at, target=plan.target,
                  mode=plan.mode, rate=plan.rate, batch=plan.batch, duration_s=dur,
                  procs=plan.procs, connections_per_proc=plan.connections, gzip=plan.gzip,
                  timeout_s=plan.timeout_s, interval_s=iv_s, seed=plan.traffic.seed,
                  replay=plan.replay, pregenerated=plan.pregenerate, spike=plan.spike,
                  cpus=cpus, python=python, title=title),
        totals=totals, latency=percentiles_of(latency),
        latency_histogram=latency.to_dict(),
        latency_spectrum=[(round(p, 5), v / 1000) for p, v in latency.spectrum()],
        status_counts=status, events_by_status=events_by_status, errors=errors,
        retry_after=_retry_after(retry_after), reject_reasons=reasons,
        unexpected_5xx=other_5xx, series=series, phases=phase_list, spike=spike_report,
        server=server, generator=generator, client=client, notes=[])
    report.notes.extend(_notes(report))
    return report


def _notes(r: Report) -> list[str]:
    """Plain-language warnings about what limits the numbers."""
    notes = []
    t = r.totals
    if t.requests_completed == 0:
        notes.append("No request got a response: check --target and that the server runs.")
    if t.batches_unsent:
        share = t.batches_unsent / max(1, t.batches_scheduled)
        notes.append(
            f"{t.batches_unsent} batches ({share:.1%} of those scheduled) were never sent: every "
            "connection was busy until the end, so the target did not keep up with the offered "
            "rate. Latency percentiles exclude these batches; raise --connections or lower "
            "--rate to measure them.")
    if r.meta.mode == "open" and r.client.schedule_lag.p99_ms > 20:
        notes.append(
            f"The generator ran late on its own schedule (p99 {r.client.schedule_lag.p99_ms:.1f} "
            "ms): the client was CPU-bound, so part of the latency is the load generator's. "
            "Use fewer --procs than cores left free by the server, or a lower --rate.")
    if r.meta.mode == "closed":
        notes.append("Closed loop (--rate max): latency is service time per request and "
                     "hides queueing; use a fixed --rate for latency under load.")
    busy = max(r.client.generate_s, default=0.0) / max(r.meta.duration_s, 1e-9)
    if busy > 0.3:
        notes.append(
            f"A generator process spent {busy:.0%} of the run building request bodies; on a "
            "machine shared with the server the client limits throughput. An open-loop run "
            "(--rate N) pre-generates bodies before the start.")
    g = r.generator
    if g is not None:
        if g.pace < 0.999:
            notes.append(
                f"Sessions were played {1 / g.pace:.1f}x faster than real time so the user "
                f"population could produce the rate (raise --users for real pacing).")
        if g.events and g.compressed / g.events > 0.01:
            notes.append(f"{g.compressed / g.events:.1%} of events had their gap compressed: "
                         "too few idle users for the rate (raise --users).")
    if r.unexpected_5xx:
        notes.append(f"{r.unexpected_5xx} responses were 5xx other than 503 (server errors).")
    if r.errors:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items()))
        notes.append(f"Requests without an HTTP response: {kinds}.")
    if not r.server.available:
        notes.append(f"Server metrics unavailable: {r.server.note}.")
    return notes


# ------------------------------------------------------------------ output
def encode(report: Report) -> bytes:
    """The JSON bytes of ``report.json`` (indented for people, stable key order)."""
    return msgspec.json.format(msgspec.json.encode(report), indent=2)


def decode(data: bytes) -> Report:
    """Decode and validate a ``report.json``; raises ``msgspec.ValidationError``."""
    return msgspec.json.decode(data, type=Report)


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "max"
    return f"{v:,.0f}"


def summary_text(r: Report) -> str:
    """A short terminal summary of a report."""
    m, t, lat = r.meta, r.totals, r.latency
    lines = [
        (f"evd bench: {m.mode} loop, rate {_fmt_rate(m.rate)} ev/s, batch {m.batch}, "
        f"{m.duration_s:g}s, {m.procs} procs x {m.connections_per_proc} conns"
        f"{', gzip' if m.gzip else ''} -> {m.target}"),
        (f"  sent      {t.events_sent:,} events in {t.batches_sent:,} requests "
        f"({t.sent_events_per_s:,.0f} ev/s, {t.requests_per_s:,.0f} req/s)"),
        (f"  accepted  {t.events_accepted:,} events ({t.accepted_events_per_s:,.0f} ev/s), "
        f"duplicates {t.events_duplicate:,}, rejected {t.events_rejected:,}"),
        f"  latency   p50 {lat.p50_ms:.2f} ms  p90 {lat.p90_ms:.2f}  p99 {lat.p99_ms:.2f}  "
        f"p99.9 {lat.p999_ms:.2f}  max {lat.max_ms:.2f}"
        + ("  (from scheduled send time)" if m.mode == "open" else "  (service time)"),
        "  statuses  " + ", ".join(f"{k}: {v:,}" for k, v in sorted(r.status_counts.items())),
    ]
    if t.batches_unsent:
        lines.append(f"  UNSENT    {t.batches_unsent:,} scheduled batches never sent "
                     "(target could not keep up)")
    if r.retry_after is not None:
        ra = r.retry_after
        lines.append(f"  Retry-After on {ra.count:,} responses: {ra.min_s:g}..{ra.max_s:g} s")
    s = r.server
    if s.available:
        acc = "?" if s.accepted is None else f"{s.accepted:,.0f}"
        dup = "?" if s.duplicates is None else f"{s.duplicates:,.0f}"
        lines.append(f"  server    accepted {acc}, duplicates {dup}, rejected "
                     + (", ".join(f"{k}={v:,.0f}" for k, v in s.rejected_by_reason.items())
                        or "0"))
    d = s.delivery_delay
    if s.delivery_delay_by_sink:
        for sink, ds in s.delivery_delay_by_sink.items():
            lines.append(
                f"  delivery  {sink}: p50 {ds.p50_ms} ms  p99 {ds.p99_ms} ms  ({ds.count:,} events)"
                if ds.available else f"  delivery  {sink}: {ds.note}"
            )
    elif d.available:
        lines.append(f"  delivery  p50 {d.p50_ms} ms  p99 {d.p99_ms} ms  ({d.count:,} events,"
                     " summed over sinks)")
    else:
        lines.append(f"  delivery  {d.note}")
    sp = r.spike
    if sp is not None:
        rec = f"recovered {sp.recovery_s:g}s after" if sp.recovered else "NOT recovered by end"
        lines.append(
            f"  spike     x{sp.factor:g} to {sp.spike_rate:,.0f} ev/s at {sp.at_s:g}-"
            f"{sp.end_s:g}s: shed {sp.shed_during:,}/{sp.requests_during:,} requests "
            f"({sp.shed_fraction_during:.1%}), other 5xx {sp.other_5xx}, {rec}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
