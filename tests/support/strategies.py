"""Hypothesis strategies for client events, and the per-event reference check."""

from __future__ import annotations

import json
import string
from typing import Any

import msgspec
from evdtest import make_event
from hypothesis import strategies as st

from evd.core.errors import explain_validation
from evd.core.schema import COUNTRIES, check_event, event_decoder


def error_of(raw: dict[str, Any] | Any) -> str | None:
    """What the edge reports for one event: None if valid, else "path: reason"."""
    try:
        event = event_decoder.decode(json.dumps(raw).encode())
    except msgspec.ValidationError as exc:
        return explain_validation(exc)
    return check_event(event)


_BASE62 = string.ascii_letters + string.digits

track_ids = st.one_of(
    st.text(_BASE62, min_size=22, max_size=22).map(lambda s: "spotify:track:" + s),
    st.text(min_size=22, max_size=22).map(lambda s: "spotify:track:" + s),
    st.text(_BASE62 + ":-é", min_size=30, max_size=40).map(lambda s: "spotify:track:" + s[:22]),
    st.just("spotify:track:spotify:track:" + "a" * 8),
    st.text(min_size=36, max_size=36),
    st.sampled_from(["spotify:album:" + "a" * 22, "SPOTIFY:TRACK:" + "a" * 22]),
)
countries = st.one_of(
    st.sampled_from(sorted(COUNTRIES)),
    st.text(string.ascii_letters, min_size=2, max_size=2),
    st.text(min_size=2, max_size=2),
)
playbacks = st.tuples(st.integers(0, 300_000), st.integers(1, 300_000)).map(
    lambda pd: {"position_ms": pd[0], "duration_ms": pd[1]}
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    event = make_event(f"p-{draw(st.integers(0, 10**6))}")
    event["track_id"] = draw(track_ids)
    event["playback"] = draw(playbacks)
    event["geo"] = draw(st.one_of(st.none(), countries.map(lambda c: {"country": c})))
    if event["geo"] is None:
        del event["geo"]
    return event
