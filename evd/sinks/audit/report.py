"""``evd audit``: the audit ledger's counts as a table, per hour and event type.

For every hour, event type and sink that takes the ``events`` stream:

    accepted - duplicate == delivered + dead_lettered + filtered

or the hour is flagged. Hours are UTC by ``received_at`` (when the edge took
the request). An hour whose events are still on their way (the pipeline's lag)
reads as a discrepancy until they arrive: run it once the pipeline settled, or
look at the hours before the last few minutes.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from evd.core.log import Stream
from evd.sinks import rows
from evd.sinks.audit.ledger import read_counts, read_stages
from evd.sinks.audit.stage import AUDIT_STAGE

__all__ = ["Report", "hour_text", "parse_hour", "render", "report"]


class Report(msgspec.Struct):
    """One row of ``evd audit``: an hour and event type of the events stream."""

    hour: str
    event_type: str
    accepted: int
    rejected: int
    duplicate: int
    late: int
    #: sink -> {"delivered", "dead_lettered", "filtered"}
    sinks: dict[str, dict[str, int]]
    #: Sinks whose counts do not add up to accepted - duplicate.
    discrepancies: list[str]


def hour_text(hour_ms: int) -> str:
    return datetime.fromtimestamp(hour_ms / 1000, UTC).strftime("%Y-%m-%dT%H")


def parse_hour(text: str) -> int:
    """``2026-12-01T10`` (or ``2026-12-01T10:00``, ``2026-12-01 10``) -> the hour's epoch ms."""
    cleaned = text.strip().replace(" ", "T").rstrip("Z")
    for fmt in ("%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            dt = datetime.strptime(cleaned, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return rows.hour_of(int(dt.timestamp() * 1000))
    raise ValueError(f"--hour {text!r}: expected YYYY-MM-DDTHH (UTC)")


def report(data_dir: str | Path, hour: int | None = None) -> list[Report]:
    """The audit of every hour (or one) and event type of the events stream."""
    stages = read_stages(data_dir)
    event_sinks = {
        name: types for name, (kind, streams, types) in stages.items()
        if kind == "sink" and Stream.EVENTS in streams
    }
    table: dict[tuple[int, str], Counter[tuple[str, str]]] = {}
    for h, stream, event_type, stage, metric, n in read_counts(data_dir, hour):
        if stream != Stream.EVENTS:
            continue
        table.setdefault((h, event_type), Counter())[stage, metric] += n
    out = []
    for (h, event_type), c in sorted(table.items()):
        accepted = c[AUDIT_STAGE, "accepted"]
        duplicate = c[AUDIT_STAGE, "duplicate"]
        sinks = {
            name: {m: c[name, m] for m in ("delivered", "dead_lettered", "filtered")}
            for name in sorted(event_sinks)
        }
        wrong = [
            name for name, got in sinks.items()
            if sum(got.values()) != accepted - duplicate
        ]
        out.append(Report(
            hour=hour_text(h), event_type=event_type, accepted=accepted,
            rejected=c[AUDIT_STAGE, "rejected"], duplicate=duplicate, late=c[AUDIT_STAGE, "late"],
            sinks=sinks, discrepancies=wrong,
        ))
    return out


def render(reports: list[Report]) -> str:
    """The report as a text table; flagged rows end with ``<- DIFFERS: sink, ...``."""
    if not reports:
        return "no audit counts yet (nothing accepted, or the pipeline has not counted it)\n"
    sinks = sorted({s for r in reports for s in r.sinks})
    head = ["hour (UTC)", "event_type", "accepted", "rejected", "duplicate", "late"]
    head += [f"{s}:delivered" for s in sinks]
    lines = [head]
    for r in reports:
        row = [r.hour, r.event_type, str(r.accepted), str(r.rejected), str(r.duplicate), str(r.late)]
        for s in sinks:
            got = r.sinks.get(s, {})
            cell = str(got.get("delivered", 0))
            extra = got.get("dead_lettered", 0), got.get("filtered", 0)
            if any(extra):
                cell += f" (+{extra[0]} dead, +{extra[1]} filtered)"
            row.append(cell)
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = []
    flags = [""] + [
        "  <- DIFFERS: " + ", ".join(r.discrepancies) if r.discrepancies else ""
        for r in reports
    ]
    for line, flag in zip(lines, flags, strict=True):
        cells = "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        text.append(cells + flag)
    flagged = sum(1 for r in reports if r.discrepancies)
    text.append(
        f"{flagged} hour/event type row(s) where accepted - duplicate != delivered + dead-lettered"
        " + filtered" if flagged else "every hour adds up: accepted - duplicate = delivered"
        " + dead-lettered + filtered, for every sink of the events stream"
    )
    return "\n".join(text) + "\n"
