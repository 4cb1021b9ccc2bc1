"""The audit ledger (evd.sinks.audit.ledger) and the report of ``evd audit``
(evd.sinks.audit.report), on real ledger files: counts and offsets commit together,
several workers add to the same counts, the report flags exactly the hours
that do not add up, and the command's exit status says so."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from evdtest import run_cli

from evd.core.log import SubLog, records
from evd.core.log.records import Kind
from evd.core.schema import DeadLetter, EventsBatch, RawBatch
from evd.sinks.audit.ledger import CountKey, Ledger, SeenKey, read_counts
from evd.sinks.audit.report import parse_hour, render, report
from evd.sinks.audit.stage import AuditStage
from evd.sinks.base import Batch

pytestmark = pytest.mark.workers_independent

H10 = 1_764_583_200_000  # 2025-12-01T10:00Z
H11 = H10 + 3_600_000


async def test_counts_and_offsets_commit_together_and_add_up_across_handles(
    tmp_path: Path,
) -> None:
    a, b = Ledger(tmp_path), Ledger(tmp_path)  # two workers
    await a.register("lake", "sink", ["events"], None)
    await b.register("lake", "sink", ["events"], None)
    sub0, sub1 = SubLog("events", 0, 0), SubLog("events", 1, 1)
    key = CountKey(H10, "events", "play", "delivered")
    await asyncio.gather(*(
        a.commit("lake", {key: 1}, {sub0: i}, {SeenKey("events", 0, 0): i}) for i in range(20)
    ), *(b.commit("lake", {key: 2}, {sub1: 5}, {}) for _ in range(10)))
    offsets, seen = await a.offsets("lake")
    assert offsets == {sub0: 19, sub1: 5}
    assert seen == {SeenKey("events", 0, 0): 19}
    assert read_counts(tmp_path) == [(H10, "events", "play", "lake", "delivered", 40)]
    await a.close()
    await b.close()


async def write_ledger(root: Path, delivered: dict[str, int]) -> None:
    ledger = Ledger(root)
    for sink in ("lake", "warehouse"):
        await ledger.register(sink, "sink", ["events", "sessions"], None)
    await ledger.register("hooks", "sink", ["sessions"], None)  # not an events sink
    await ledger.register("audit", "audit", ["raw", "dead_letter", "events"], None)
    await ledger.commit("audit", {
        CountKey(H10, "events", "play", "accepted"): 10,
        CountKey(H10, "events", "play", "duplicate"): 2,
        CountKey(H10, "events", "play", "late"): 1,
        CountKey(H10, "events", "skip", "accepted"): 3,
        CountKey(H10, "events", "invalid", "rejected"): 4,
        CountKey(H11, "events", "play", "accepted"): 5,
    }, {}, {})
    counts = {
        CountKey(H10, "events", "play", "delivered"): 8,
        CountKey(H10, "events", "skip", "delivered"): 3,
        CountKey(H11, "events", "play", "delivered"): 5,
        CountKey(H10, "sessions", "session", "delivered"): 7,
    }
    await ledger.commit("lake", counts, {}, {})
    await ledger.commit("warehouse", {
        **counts,
        CountKey(H10, "events", "play", "delivered"): delivered["play"],
        CountKey(H10, "events", "play", "dead_lettered"): delivered.get("dead", 0),
    }, {}, {})
    await ledger.close()


async def test_the_report_flags_exactly_the_rows_that_do_not_add_up(tmp_path: Path) -> None:
    await write_ledger(tmp_path, {"play": 6, "dead": 2})  # 6 + 2 dead = 10 - 2 duplicates
    rows = report(tmp_path)
    assert [(r.hour, r.event_type, r.accepted, r.duplicate, r.late, r.rejected) for r in rows] == [
        ("2025-12-01T10", "invalid", 0, 0, 0, 4),
        ("2025-12-01T10", "play", 10, 2, 1, 0),
        ("2025-12-01T10", "skip", 3, 0, 0, 0),
        ("2025-12-01T11", "play", 5, 0, 0, 0),
    ]
    assert set(rows[1].sinks) == {"lake", "warehouse"}  # hooks takes no events
    assert rows[1].sinks["warehouse"] == {"delivered": 6, "dead_lettered": 2, "filtered": 0}
    # The rejected-only row: nothing accepted, nothing to deliver.
    assert all(r.discrepancies == [] for r in rows)
    assert "every hour adds up" in render(rows)
    assert [r.hour for r in report(tmp_path, parse_hour("2025-12-01T11"))] == ["2025-12-01T11"]

    # Negative control: one event missing from the warehouse.
    other = tmp_path / "short"
    await write_ledger(other, {"play": 7})
    rows = report(other)
    assert [(r.hour, r.event_type, r.discrepancies) for r in rows if r.discrepancies] == [
        ("2025-12-01T10", "play", ["warehouse"])
    ]
    assert "<- DIFFERS: warehouse" in render(rows)


async def test_evd_audit_exit_status_and_json(tmp_path: Path) -> None:
    await write_ledger(tmp_path / "ok", {"play": 8})
    await write_ledger(tmp_path / "bad", {"play": 1})
    ok = run_cli("audit", "--data-dir", str(tmp_path / "ok"))
    assert ok.returncode == 0 and "every hour adds up" in ok.stdout, ok.stdout + ok.stderr
    bad = run_cli("audit", "--data-dir", str(tmp_path / "bad"), "--json")
    assert bad.returncode == 1
    flagged = [json.loads(line) for line in bad.stdout.splitlines()]
    assert [r["discrepancies"] for r in flagged if r["discrepancies"]] == [["warehouse"]]
    one = run_cli("audit", "--data-dir", str(tmp_path / "ok"), "--hour", "2025-12-01T11")
    assert one.returncode == 0 and "2025-12-01T10" not in one.stdout
    wrong = run_cli("audit", "--data-dir", str(tmp_path / "ok"), "--hour", "yesterday")
    assert wrong.returncode == 2 and "--hour 'yesterday'" in wrong.stderr
    empty = run_cli("audit", "--data-dir", str(tmp_path / "none"))
    assert empty.returncode == 0 and "no audit counts yet" in empty.stdout


def test_the_audit_stage_counts_from_the_records_themselves() -> None:
    from datetime import UTC, datetime

    from evd.core.schema import Event, Playback

    def e(eid: str, kind: str = "play") -> Event:
        return Event(eid, datetime(2025, 12, 1, 10, tzinfo=UTC), "u", "spotify:track:" + "a" * 22,
                     Playback(0, 1), kind)  # type: ignore[arg-type]

    stage = AuditStage()
    raw = records.encode(Kind.RAW, H10 + 5, RawBatch(H10 + 5, [e("a"), e("b", "skip")]))
    events = records.encode_events(Kind.EVENTS, H10 + 5, EventsBatch(
        H10 + 5, [e("a"), e("b", "skip")], 0, [1], {"play": 3}, 0, 9,
    ))
    dead = [
        records.encode(Kind.DEAD_LETTER, H11, DeadLetter(H11, 0, "x", b'{"event_type": "seek"}')),
        records.encode(Kind.DEAD_LETTER, H11, DeadLetter(H11, 1, "x", b'{"event_type": 3}')),
        records.encode(Kind.DEAD_LETTER, H11, DeadLetter(H11, -1, "x", b"{}", "sink:lake")),
    ]
    from evd.core.metrics.slots import HOT
    from evd.sinks import metrics

    counted = HOT.counts[metrics.AUDIT_ROWS.slot]
    got: Counter[tuple[int, str, str, str]] = Counter()
    for stream, payloads in (("raw", [raw]), ("events", [events]), ("dead_letter", dead)):
        values = [stage.decode(stream, p) for p in payloads]
        got.update(stage.counts(Batch(stream, values, len(values), 0)))
    assert got == {
        (H10, "events", "play", "accepted"): 1, (H10, "events", "skip", "accepted"): 1,
        (H10, "events", "play", "duplicate"): 3, (H10, "events", "skip", "late"): 1,
        (H11, "events", "seek", "rejected"): 1, (H11, "events", "invalid", "rejected"): 1,
    }
    assert HOT.counts[metrics.AUDIT_ROWS.slot] - counted == 2  # evd_audit_events_total: accepted


@pytest.mark.parametrize("n", [1, 15, 16, 300])  # msgpack fixarray, then array 16
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "version-0"])
def test_the_audit_counts_records_of_any_size_and_version(n: int, tagged: bool) -> None:
    from datetime import UTC, datetime

    import msgspec

    from evd.core.schema import Event, Playback

    kinds = ["play", "skip", "pause"]
    evs = [
        Event(f"e{i}", datetime(2025, 12, 1, 10, tzinfo=UTC), "u", "spotify:track:" + "a" * 22,
              Playback(0, 1), kinds[i % 3])  # type: ignore[arg-type]
        for i in range(n)
    ]
    late = [i for i in range(n) if i % 4 == 1]
    raw_value = RawBatch(H10 + 5, evs)
    events_value = EventsBatch(H10 + 5, evs, 0, late, {"skip": 2}, 0, 9)
    if tagged:
        raw = records.encode(Kind.RAW, H10 + 5, raw_value)
        events = records.encode_events(Kind.EVENTS, H10 + 5, events_value)
    else:  # written before records were tagged: a bare msgpack map
        raw = msgspec.msgpack.encode(raw_value)
        events = msgspec.msgpack.encode(events_value)
    stage = AuditStage()
    rv, ev = stage.decode("raw", raw), stage.decode("events", events)
    assert len(ev.events) == n and (ev.raw_source, ev.raw_offset) == (0, 9)  # what the loop reads
    got: Counter[tuple[int, str, str, str]] = Counter()
    got.update(stage.counts(Batch("raw", [rv], 1, 0)))
    got.update(stage.counts(Batch("events", [ev], n, 0)))
    want: Counter[tuple[int, str, str, str]] = Counter()
    for i, event in enumerate(evs):
        want[H10, "events", event.event_type, "accepted"] += 1
        if i in late:
            want[H10, "events", event.event_type, "late"] += 1
    want[H10, "events", "skip", "duplicate"] += 2
    assert got == want


def test_the_length_of_an_events_array_is_read_from_its_header() -> None:
    import msgspec

    from evd.core.log.records import RecordFormatError
    from evd.sinks.audit.stage import _array_len

    raw = msgspec.msgpack.Decoder(msgspec.Raw).decode
    assert _array_len(raw(msgspec.msgpack.encode([]))) == 0
    assert _array_len(raw(msgspec.msgpack.encode(list(range(16))))) == 16
    assert _array_len(raw(msgspec.msgpack.encode([0] * 70_000))) == 70_000  # array 32
    with pytest.raises(RecordFormatError):
        _array_len(raw(msgspec.msgpack.encode({"a": 1})))


def test_the_audit_decodes_records_fetched_together_as_one_by_one() -> None:
    from datetime import UTC, datetime

    import msgspec

    from evd.core.schema import Event, Playback

    def e(i: int) -> Event:
        return Event(f"e{i}", datetime(2025, 12, 1, 10, tzinfo=UTC), "u",
                     "spotify:track:" + "a" * 22, Playback(0, 1),
                     ["play", "skip"][i % 2])  # type: ignore[arg-type]

    stage = AuditStage()
    raws = [records.encode(Kind.RAW, H10 + i, RawBatch(H10 + i, [e(j) for j in range(i + 1)]))
            for i in range(4)]
    events = [records.encode_events(Kind.EVENTS, H11, EventsBatch(
        H11, [e(j) for j in range(i + 1)], 0, [i], {"play": i}, 0, i,
    )) for i in range(4)]
    old = msgspec.msgpack.encode(RawBatch(H10, [e(0)]))  # untagged: one by one
    for stream, payloads in (("raw", raws), ("events", events), ("raw", [*raws, old])):
        together = stage.decode_all(stream, payloads)
        alone = [stage.decode(stream, p) for p in payloads]
        assert stage.counts(Batch(stream, together, 0, 0)) == stage.counts(Batch(stream, alone, 0, 0))
        assert [len(v.events) for v in together] == [len(v.events) for v in alone]
