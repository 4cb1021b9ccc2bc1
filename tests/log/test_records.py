"""The record format: tags, versions, untagged (version 0) records, and the raw
events forwarded to the ``events`` stream without encoding them again."""

from __future__ import annotations

import msgspec
import pytest
from evdtest import make_event

from evd.core.log import records
from evd.core.log.records import Kind, RecordFormatError
from evd.core.schema import Event, EventsBatch, RawBatch, event_decoder

pytestmark = pytest.mark.workers_independent


def events(n: int) -> list[object]:
    return [
        event_decoder.decode(msgspec.json.encode(make_event(f"r-{i}", user_id=f"u{i}")))
        for i in range(n)
    ]


def test_a_tagged_record_carries_kind_version_and_timestamp() -> None:
    batch = RawBatch(123, events(3), 7)  # type: ignore[arg-type]
    payload = records.encode(Kind.RAW, 456, batch)
    head = records.header_of(payload, "raw")
    assert (head.kind, head.version, head.timestamp) == (Kind.RAW, records.VERSION, 456)
    assert records.decode(payload, "raw") == batch
    decoded, raw = records.decode_raw(payload)
    assert decoded == batch
    assert msgspec.msgpack.decode(raw, type=list[Event]) == batch.events


def test_an_untagged_record_is_version_0_of_its_streams_kind() -> None:
    batch = RawBatch(1, events(2))  # type: ignore[arg-type]
    old = msgspec.msgpack.encode(batch)  # as written before records were tagged
    assert records.header_of(old, "raw").version == 0
    assert records.decode(old, "raw") == batch
    assert records.decode_raw(old)[0] == batch
    with pytest.raises(RecordFormatError, match="never had them"):
        records.header_of(old, "somewhere")


def test_a_newer_version_or_another_kind_is_refused() -> None:
    payload = bytearray(records.encode(Kind.RAW, 1, RawBatch(1, [])))
    payload[3] = records.VERSION + 1
    with pytest.raises(RecordFormatError, match="newer"):
        records.decode(bytes(payload), "raw")
    with pytest.raises(RecordFormatError, match="kind"):
        records.decode_raw(records.encode(Kind.CHARTS, 1, RawBatch(1, [])))


@pytest.mark.parametrize(("skew", "late"), [(0, []), (5, [1]), (0, [0, 2])])
def test_forwarded_events_encode_to_the_same_bytes(skew: int, late: list[int]) -> None:
    batch = RawBatch(99, events(3), skew)  # type: ignore[arg-type]
    _, raw = records.decode_raw(records.encode(Kind.RAW, 99, batch))
    out = EventsBatch(99, batch.events, skew, late)
    forwarded = records.encode_events(Kind.EVENTS, 99, out, raw)
    assert forwarded == records.encode(Kind.EVENTS, 99, out)
    assert records.decode(forwarded, "events") == out


def test_decode_all_decodes_records_together_and_names_an_unreadable_one() -> None:
    from evd.core.schema import ChartsBatch

    charts = [records.encode(Kind.CHARTS, i, ChartsBatch(i, 1000 + i, [])) for i in range(5)]
    assert records.join_bodies(charts) is not None
    assert [v.closed_until for v in records.decode_all(charts, "charts")] == [1000 + i for i in range(5)]
    # Mixed kinds or versions are decoded one by one, each as its header says.
    untagged = msgspec.msgpack.encode(ChartsBatch(9, 1009, []))
    mixed = [*charts[:2], untagged]
    assert records.join_bodies(mixed) is None
    assert [v.closed_until for v in records.decode_all(mixed, "charts")] == [1000, 1001, 1009]
    # A record that does not decode fails the joined call, then decode() names it.
    broken = [*charts[:2], charts[2][:-3] + b"\xc1\xc1\xc1"]
    with pytest.raises(records.RecordFormatError, match="charts record does not decode"):
        records.decode_all(broken, "charts")
