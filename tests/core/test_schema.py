"""The event schema: the seed event, field rules and their error paths, codecs, and
a property that the bulk validator agrees with the per-event one."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from evdtest import make_event, seed_bytes, track_id
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from strategies import error_of, events

from evd.core.schema import (
    DeadLetter,
    Event,
    RawBatch,
    batch_is_valid,
    check_event,
    dead_letter_decoder,
    epoch_ms,
    event_decoder,
    event_id_of,
    msgpack_encoder,
    raw_batch_decoder,
)

HYPOTHESIS_SEED = int(os.environ.get("EVD_TEST_SEED") or 20240502)


def test_seed_event_decodes_as_a_play() -> None:
    event = event_decoder.decode(seed_bytes())
    assert check_event(event) is None
    assert batch_is_valid([event])
    assert event.event_type == "play"
    assert event.event_id == "a1b2c3d4-e5f6-7890-g1h2-i3j4k5l6m7n8"  # not a UUID, still an id
    assert event.context is not None and event.context.playlist_uri is not None
    assert event.geo is not None and (event.geo.country, event.geo.region) == ("US", "CA")
    assert epoch_ms(event.timestamp) == 1698401730123


def test_timestamps_with_an_offset_are_the_same_instant() -> None:
    utc = event_decoder.decode(json.dumps(make_event("t1", timestamp="2024-05-01T10:00:00Z")))
    local = event_decoder.decode(
        json.dumps(make_event("t2", timestamp="2024-05-01T12:00:00+02:00"))
    )
    assert epoch_ms(utc.timestamp) == epoch_ms(local.timestamp)
    assert epoch_ms(utc.timestamp) == int(datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize("event_type", ["play", "pause", "resume", "seek", "skip", "end"])
def test_every_event_type_is_valid(event_type: str) -> None:
    assert error_of(make_event("et", event_type=event_type)) is None


def test_optional_sections_may_be_absent() -> None:
    assert error_of(make_event("opt", context=None, device=None, geo=None)) is None
    event = make_event("opt2")
    event["geo"] = {"country": "US"}
    event["playback"] = {"position_ms": 0, "duration_ms": 1}
    assert error_of(event) is None


def test_ids_of_1_to_64_characters_are_valid() -> None:
    assert error_of(make_event("x")) is None
    assert error_of(make_event("x" * 64)) is None


def _without(event: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != key}


@pytest.mark.parametrize(
    "raw, path",
    [
        (make_event(""), "event_id"),
        (make_event("x" * 65), "event_id"),
        ({**make_event("n"), "event_id": 5}, "event_id"),
        (_without(make_event("m"), "event_id"), "event_id"),
        (_without(make_event("m"), "user_id"), "user_id"),
        (_without(make_event("m"), "timestamp"), "timestamp"),
        (_without(make_event("m"), "track_id"), "track_id"),
        (_without(make_event("m"), "playback"), "playback"),
        (make_event("ts", timestamp="2024-05-01T12:00:00"), "timestamp"),
        (make_event("ts", timestamp="yesterday"), "timestamp"),
        (make_event("tr", track_id="spotify:track:tooshort"), "track_id"),
        (make_event("tr", track_id="spotify:album:" + track_id(1)[14:]), "track_id"),
        (make_event("tr", track_id="spotify:track:" + "-" * 22), "track_id"),
        (make_event("tr", track_id="spotify:track:" + "é" * 22), "track_id"),
        (make_event("pb", playback={"position_ms": -1, "duration_ms": 10}), "playback.position_ms"),
        (make_event("pb", playback={"position_ms": 11, "duration_ms": 10}), "playback.position_ms"),
        (make_event("pb", playback={"position_ms": 0, "duration_ms": 0}), "playback.duration_ms"),
        (make_event("pb", playback={"duration_ms": 10}), "playback.position_ms"),
        (make_event("geo", geo={"country": "ZZ"}), "geo.country"),
        (make_event("geo", geo={"country": "us"}), "geo.country"),
        (make_event("geo", geo={"country": "USA"}), "geo.country"),
        (make_event("geo", geo={"region": "CA"}), "geo.country"),
        (make_event("type", event_type="stop"), "event_type"),
        (make_event("dev", device={"os": "x" * 300}), "device.os"),
        (make_event("uid", user_id=""), "user_id"),
    ],
)
def test_invalid_field_is_reported_with_its_path(raw: dict[str, Any], path: str) -> None:
    error = error_of(raw)
    assert error is not None and error.startswith(f"{path}: "), error


def test_event_id_of_is_best_effort() -> None:
    assert event_id_of(b'{"event_id": "abc", "x": 1}') == "abc"
    assert event_id_of(msgspec.Raw(b'{"event_id": "abc"}')) == "abc"
    assert event_id_of(b'{"event_id": 5}') is None
    assert event_id_of(b"42") is None
    assert event_id_of(b'{"other": 1}') is None


def test_raw_batch_and_dead_letter_round_trip_through_msgpack() -> None:
    event = event_decoder.decode(seed_bytes())
    record = RawBatch(received_at=1_700_000_000_000, events=[event, event], skew_ms=-5)
    assert raw_batch_decoder.decode(msgpack_encoder.encode(record)) == record
    plain = RawBatch(received_at=1, events=[event])
    assert raw_batch_decoder.decode(msgpack_encoder.encode(plain)).skew_ms == 0
    letter = DeadLetter(received_at=1, index=3, error="geo.country: nope", event=b'{"a":1}')
    assert dead_letter_decoder.decode(msgpack_encoder.encode(letter)) == letter


# -- property: the bulk check agrees with the per-event check ------------------------------


@seed(HYPOTHESIS_SEED)
@settings(max_examples=150, deadline=None, database=None)
@given(st.lists(events(), min_size=1, max_size=8))
def test_bulk_validation_agrees_with_per_event_checks(raws: list[dict[str, Any]]) -> None:
    print(f"hypothesis seed: {HYPOTHESIS_SEED} (rerun with EVD_TEST_SEED={HYPOTHESIS_SEED})")
    decoded: list[Event] = []
    for raw in raws:
        try:
            decoded.append(event_decoder.decode(json.dumps(raw).encode()))
        except msgspec.ValidationError:
            pass  # the decoder's own constraints (e.g. track_id length) reject it
    for event in decoded:
        assert batch_is_valid([event]) == (check_event(event) is None), event
    assert batch_is_valid(decoded) == all(check_event(e) is None for e in decoded)
