"""Self-contained HTML report: tables and inline SVG charts, no scripts, no network.

The page is one file that any browser opens offline; every chart is SVG built
here from the report's data, so what it shows is exactly what ``report.json`` says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from evd.bench.report import Percentiles, Report

WIDTH = 1100
HEIGHT = 300
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 70, 20, 34, 44
COLORS = ("#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")

Series = tuple[str, str, Sequence[tuple[float, float]]]


def _nice_step(span: float, ticks: int = 5) -> float:
    if span <= 0:
        return 1.0
    raw = span / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def line_chart(title: str, series: Sequence[Series], x_label: str, y_label: str, *,
               log_y: bool = False, shade: tuple[float, float] | None = None,
               x_ticks: Sequence[tuple[float, str]] | None = None,
               x_range: tuple[float, float] | None = None) -> str:
    """Return an SVG line chart; ``series`` is ``(label, color, [(x, y), ...])``."""
    pts = [p for _, _, data in series for p in data]
    w, h = WIDTH, HEIGHT
    pw, ph = w - _PAD_L - _PAD_R, h - _PAD_T - _PAD_B
    out = [(f'<svg class="chart" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'),
           f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="{_PAD_L}" y="20" font-size="15" font-weight="bold">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#888">'
                   'no data</text></svg>')
        return "".join(out)
    x0 = min(p[0] for p in pts)
    x1 = max(p[0] for p in pts)
    if x_range is not None:
        x0, x1 = min(x0, x_range[0]), max(x1, x_range[1])
    if x_ticks:
        x0 = min(x0, min(t for t, _ in x_ticks))
        x1 = max(x1, max(t for t, _ in x_ticks))
    if x1 <= x0:
        x1 = x0 + 1
    ys = [p[1] for p in pts]
    if log_y:
        positive = [y for y in ys if y > 0] or [1.0]
        y0 = 10 ** math.floor(math.log10(min(positive)))
        y1 = 10 ** math.ceil(math.log10(max(positive) * 1.01))
        if y1 <= y0:
            y1 = y0 * 10

        def ty(y: float) -> float:
            y = max(y, y0)
            return _PAD_T + ph - (math.log10(y) - math.log10(y0)) / (
                math.log10(y1) - math.log10(y0)) * ph
        yt = []
        v = y0
        while v <= y1 * 1.0001:
            yt.append(v)
            v *= 10
    else:
        y0 = 0.0
        top = max(ys) if max(ys) > 0 else 1.0
        step = _nice_step(top)
        y1 = step * math.ceil(top * 1.05 / step)

        def ty(y: float) -> float:
            return _PAD_T + ph - (y - y0) / (y1 - y0) * ph
        yt = [step * i for i in range(round(y1 / step) + 1)]

    def tx(x: float) -> float:
        return _PAD_L + (x - x0) / (x1 - x0) * pw

    if shade is not None:
        a, b = max(shade[0], x0), min(shade[1], x1)
        if b > a:
            out.append(f'<rect x="{tx(a):.1f}" y="{_PAD_T}" width="{tx(b) - tx(a):.1f}" '
                       f'height="{ph}" fill="#fde2c8" opacity="0.7"/>'
                       f'<text x="{tx(a) + 4:.1f}" y="{_PAD_T + 12}" font-size="11" '
                       f'fill="#a0522d">spike</text>')
    for y in yt:
        yy = ty(y)
        out.append(f'<line x1="{_PAD_L}" y1="{yy:.1f}" x2="{_PAD_L + pw}" y2="{yy:.1f}" '
                   f'stroke="#e5e5e5"/><text x="{_PAD_L - 6}" y="{yy + 4:.1f}" font-size="11" '
                   f'text-anchor="end">{_fmt(y)}</text>')
    if x_ticks is None:
        step = _nice_step(x1 - x0, 10)
        first = math.ceil(x0 / step) * step
        ticks = []
        v = first
        while v <= x1 + 1e-9:
            ticks.append((v, _fmt(round(v, 6))))
            v += step
    else:
        ticks = list(x_ticks)
    for x, label in ticks:
        xx = tx(x)
        out.append(f'<line x1="{xx:.1f}" y1="{_PAD_T + ph}" x2="{xx:.1f}" y2="{_PAD_T + ph + 4}" '
                   f'stroke="#333"/><text x="{xx:.1f}" y="{_PAD_T + ph + 17}" font-size="11" '
                   f'text-anchor="middle">{escape(label)}</text>')
    out.append(f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="#333"/>')
    out.append(f'<text x="{_PAD_L + pw / 2}" y="{h - 6}" font-size="12" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{_PAD_T + ph / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {_PAD_T + ph / 2})">{escape(y_label)}</text>')
    # Legend on the title row, right of the title, so it never hides data.
    lx = _PAD_L + 20 + 8 * len(title)
    for label, color, data in series:
        if not data:
            continue
        coords = " ".join(f"{tx(x):.1f},{ty(y):.1f}" for x, y in data)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                   f'points="{coords}"/>')
        if len(data) == 1:
            x, y = data[0]
            out.append(f'<circle cx="{tx(x):.1f}" cy="{ty(y):.1f}" r="3" fill="{color}"/>')
        out.append(f'<rect x="{lx}" y="14" width="12" height="3" fill="{color}"/>'
                   f'<text x="{lx + 16}" y="19" font-size="11">{escape(label)}</text>')
        lx += 24 + 7 * len(label)
    out.append("</svg>")
    return "".join(out)


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]]) -> str:
    """Return an SVG horizontal bar chart of ``(label, value, color)``."""
    row = 24
    h = 40 + row * max(1, len(bars))
    w = WIDTH
    out = [(f'<svg class="chart" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">'),
           f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(title)}</text>']
    top = max((v for _, v, _ in bars), default=0) or 1
    label_w = 220
    for i, (label, value, color) in enumerate(bars):
        y = 32 + i * row
        bw = (w - label_w - 140) * value / top
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" font-size="12" text-anchor="end">'
                   f'{escape(label)}</text><rect x="{label_w}" y="{y + 3}" width="{bw:.1f}" '
                   f'height="{row - 8}" fill="{color}"/><text x="{label_w + bw + 6:.1f}" '
                   f'y="{y + 15}" font-size="12">{value:,.0f}</text>')
    if not bars:
        out.append('<text x="240" y="50" fill="#888">no data</text>')
    out.append("</svg>")
    return "".join(out)


def _steps(points: Sequence[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """Per-interval rates as a step line: each value spans its whole interval."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        out += [(x, y), (x + width, y)]
    return out


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _grid(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _lat(p: Percentiles) -> str:
    return (f"p50 {p.p50_ms:.2f} · p90 {p.p90_ms:.2f} · p99 {p.p99_ms:.2f} · "
            f"p99.9 {p.p999_ms:.2f} · max {p.max_ms:.2f} ms (n={p.count:,})")


def _opt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:,.2f}{unit}"


def _status_color(code: str) -> str:
    if code == "200":
        return "#2ca02c"
    if code in ("429", "503"):
        return "#ff7f0e"
    if code.startswith("5") or not code.isdigit():
        return "#d62728"
    return "#9467bd"


def stage_lag_series(report: Report) -> list[Series]:
    """One series per stage (the processor first, then sinks by name) of its lag in
    seconds at each scrape; [] when no scrape reported any lag."""
    points = report.server.series
    stages = sorted({k for p in points for k in p.lag_seconds},
                    key=lambda k: (k != "processor", k))
    return [(stage, COLORS[i % len(COLORS)],
             [(p.t_s, p.lag_seconds[stage]) for p in points if stage in p.lag_seconds])
            for i, stage in enumerate(stages)]


def render(report: Report) -> str:
    """Return the whole HTML page for ``report``."""
    r = report
    m, t = r.meta, r.totals
    shade = (r.spike.at_s, r.spike.end_s) if r.spike is not None else None
    iv = m.interval_s
    span = (0.0, m.duration_s)
    mid = [pt.t_s + iv / 2 for pt in r.series]
    thr: list[Series] = []
    if any(pt.offered_events_per_s is not None for pt in r.series):
        thr.append(("offered ev/s", COLORS[0],
                    _steps([(pt.t_s, pt.offered_events_per_s or 0.0) for pt in r.series], iv)))
    thr.append(("sent ev/s", COLORS[4],
                _steps([(pt.t_s, pt.sent_events_per_s) for pt in r.series], iv)))
    thr.append(("accepted ev/s", COLORS[1],
                _steps([(pt.t_s, pt.accepted_events_per_s) for pt in r.series], iv)))
    if r.server.series and any(p.accepted_events_per_s is not None for p in r.server.series):
        server_pts: list[tuple[float, float]] = []
        prev = 0.0
        for p in r.server.series:
            # A scrape's rate covers the span since the previous scrape.
            server_pts += [(prev, p.accepted_events_per_s or 0.0),
                           (p.t_s, p.accepted_events_per_s or 0.0)]
            prev = p.t_s
        thr.append(("server accepted ev/s", COLORS[6], server_pts))
    reqs: list[Series] = [
        ("responses/s", COLORS[1],
         _steps([(pt.t_s, pt.completed_requests_per_s) for pt in r.series], iv)),
        ("429+503/s", COLORS[3],
         _steps([(pt.t_s, pt.shed_requests_per_s) for pt in r.series], iv)),
        ("no response/s", COLORS[2],
         _steps([(pt.t_s, pt.error_requests_per_s) for pt in r.series], iv)),
    ]
    lat: list[Series] = [
        ("p50", COLORS[0], [(x, pt.p50_ms) for x, pt in zip(mid, r.series, strict=True) if pt.p50_ms > 0]),
        ("p99", COLORS[3], [(x, pt.p99_ms) for x, pt in zip(mid, r.series, strict=True) if pt.p99_ms > 0]),
        ("max", COLORS[2], [(x, pt.max_ms) for x, pt in zip(mid, r.series, strict=True) if pt.max_ms > 0]),
    ]
    spectrum = [(math.log10(1 / (1 - p / 100)) if p < 100 else 5.0, v)
                for p, v in r.latency_spectrum if p < 100]
    spec_ticks = [(0.0, "0%"), (1.0, "90%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%"),
                  (5.0, "99.999%")]
    charts = [
        line_chart("Throughput over time", thr, "seconds into the run", "events / s",
                   shade=shade, x_range=span),
        line_chart("Responses over time", reqs, "seconds into the run", "requests / s",
                   shade=shade, x_range=span),
        line_chart("Latency over time" + (" (from scheduled send time)"
                                          if m.mode == "open" else ""),
                   lat, "seconds into the run", "ms (log)", log_y=True, shade=shade,
                   x_range=span),
        line_chart("Latency by percentile (HDR histogram)", [("latency", COLORS[0], spectrum)],
                   "percentile", "ms", x_ticks=spec_ticks),
        bar_chart("Status codes (requests)",
                  [(k, float(v), _status_color(k)) for k, v in sorted(r.status_counts.items())]),
    ]
    lags = stage_lag_series(r)
    if lags:
        charts.insert(3, line_chart("Lag of each stage", lags, "seconds into the run",
                                    "seconds behind", shade=shade, x_range=span))
    if r.generator is not None:
        charts.append(bar_chart("Generated event types",
                                [(k, float(v), COLORS[0])
                                 for k, v in sorted(r.generator.by_type.items(),
                                                    key=lambda kv: -kv[1])]))
    summary = [
        ("target", m.target),
        ("mode", (f"{m.mode} loop, rate {'max' if m.rate is None else f'{m.rate:,.0f} ev/s'}, "
                 f"batch {m.batch}, {m.duration_s:g}s, {m.procs} procs x "
                 f"{m.connections_per_proc} connections{', gzip' if m.gzip else ''}")),
        ("started", m.started_at),
        ("events sent", (f"{t.events_sent:,} ({t.sent_events_per_s:,.0f} ev/s) in "
                        f"{t.batches_sent:,} requests ({t.requests_per_s:,.0f} req/s)")),
        ("accepted", (f"{t.events_accepted:,} ({t.accepted_events_per_s:,.0f} ev/s); duplicates "
                     f"{t.events_duplicate:,}; rejected {t.events_rejected:,}")),
        ("latency", _lat(r.latency)),
        ("never sent", f"{t.batches_unsent:,} of {t.batches_scheduled:,} scheduled batches"),
        ("statuses", ", ".join(f"{k}: {v:,}" for k, v in sorted(r.status_counts.items()))),
        ("Retry-After", "none" if r.retry_after is None else
         f"{r.retry_after.count:,} responses, {r.retry_after.min_s:g}..{r.retry_after.max_s:g} s"),
    ]
    sections = [f"<h2>Summary</h2>{_table(summary)}"]
    if r.notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in r.notes)
                        + "</ul>")
    if r.spike is not None:
        sp = r.spike
        sections.append("<h2>Spike</h2>" + _table([
            ("rate", (f"{sp.base_rate:,.0f} → {sp.spike_rate:,.0f} ev/s (x{sp.factor:g}) "
                     f"from {sp.at_s:g}s to {sp.end_s:g}s")),
            ("shed during spike", (f"{sp.shed_during:,} of {sp.requests_during:,} requests "
                                  f"({sp.shed_fraction_during:.1%})")),
            ("statuses during spike", ", ".join(f"{k}: {v:,}"
                                                for k, v in sorted(sp.status_during.items()))),
            ("5xx other than 503", f"{sp.other_5xx:,}"),
            ("only 200/429/503", "yes" if sp.only_expected_statuses else "NO"),
            ("Retry-After in spike", "none" if sp.retry_after is None else
             f"{sp.retry_after.min_s:g}..{sp.retry_after.max_s:g} s (mean "
             f"{sp.retry_after.mean_s:g})"),
            ("recovery", f"{sp.recovery_s:g} s after the spike" if sp.recovered
             else "not recovered by the end of the run"),
            ("recovery rule", sp.recovery_rule),
        ]))
    sections.append("<h2>Charts</h2>" + "".join(f'<div class="c">{c}</div>' for c in charts))
    sections.append("<h2>Phases</h2>" + _grid(
        ["phase", "from", "to", "offered ev/s", "requests", "shed", "latency"],
        [[p.name, f"{p.start_s:g}s", f"{p.end_s:g}s", _opt(p.offered_events_per_s),
          f"{p.requests:,}", f"{p.shed_fraction:.1%}", _lat(p.latency)] for p in r.phases]))
    s = r.server
    srows = [("metrics", "available" if s.available else f"not available: {s.note}")]
    if s.available:
        srows += [
            ("events received", _opt(s.received)), ("events accepted", _opt(s.accepted)),
            ("duplicates", _opt(s.duplicates)),
            ("rejected by reason", ", ".join(f"{k}: {v:,.0f}"
                                             for k, v in s.rejected_by_reason.items()) or "0"),
            ("request duration", "n/a" if s.request_duration is None else
             f"p50 {_opt(s.request_duration.p50_ms)} · p90 {_opt(s.request_duration.p90_ms)} · "
             f"p99 {_opt(s.request_duration.p99_ms)} ms"),
        ]
        lags = stage_lag_series(r)
        if lags:
            srows.append(("lag of each stage (s)", "; ".join(
                f"{stage}: max {max(y for _, y in pts):g}, at the last scrape {pts[-1][1]:g}"
                for stage, _, pts in lags)))
        if s.note:
            srows.append(("note", s.note))
    delays = ([(f"end-to-end delay to {sink} (received → delivered)", ds)
               for sink, ds in s.delivery_delay_by_sink.items()]
              or [("end-to-end delay (received → delivered, summed over sinks)",
                   s.delivery_delay)])
    for title, d in delays:
        srows.append((title,
                      f"p50 {_opt(d.p50_ms)} · p90 {_opt(d.p90_ms)} · p99 {_opt(d.p99_ms)} · "
                      f"p99.9 {_opt(d.p999_ms)} ms ({d.count:,} events)"
                      if d.available else d.note))
    sections.append("<h2>Server</h2>" + _table(srows))
    if r.reject_reasons:
        sections.append("<h2>Rejected events by reason</h2>" + _grid(
            ["reason", "events"], [[k, f"{v:,}"] for k, v in
                                   sorted(r.reject_reasons.items(), key=lambda kv: -kv[1])]))
    if r.generator is not None:
        g = r.generator
        sections.append("<h2>Traffic model</h2>" + _table([
            ("events", f"{g.events:,} in {g.sessions:,} new sessions"),
            ("client retries (duplicates)", f"{g.duplicates:,}"),
            ("invalid", f"{g.invalid:,}: " + ", ".join(f"{k} {v}"
                                                      for k, v in g.invalid_kinds.items())),
            ("late (offline)", f"{g.late:,}"),
            ("pace", f"{1 / g.pace:.1f}x real time" if g.pace < 0.999 else "real time"),
            ("compressed / stretched gaps", f"{g.compressed:,} / {g.stretched:,}"),
        ]))
    c = r.client
    sections.append("<h2>Load generator</h2>" + _table([
        ("processes", (f"{c.procs}; CPU s during the run "
                      f"{', '.join(f'{x:g}' for x in c.cpu_s)}")),
        ("building bodies (s)", (f"during the run {', '.join(f'{x:g}' for x in c.generate_s)}; "
                                f"before it {', '.join(f'{x:g}' for x in c.pregenerate_s)}")),
        ("connections opened", f"{c.connects:,}"),
        ("schedule lag", _lat(c.schedule_lag)),
        ("send lag (incl. waiting for a connection)", _lat(c.send_lag)),
    ]))
    title = escape(m.title or "evd bench report")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; background: #fafafa; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; background: #fff; margin: 6px 0; }}
th, td {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; font-size: 13px;
         vertical-align: top; }}
th {{ background: #f0f0f0; }}
.c {{ margin: 10px 0; border: 1px solid #ddd; width: {WIDTH}px; }}
svg text {{ font-family: inherit; }}
</style></head><body>
<h1>{title}</h1>
{''.join(sections)}
</body></html>
"""
