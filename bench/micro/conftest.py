"""Shared inputs: batches of seed-shaped events with unique ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SEED = Path(__file__).resolve().parents[2] / "tests" / "data" / "seed-event.json"


def seed_event() -> dict[str, object]:
    """The seed play event (a copy of shared/seed-event.json)."""
    return json.loads(SEED.read_text())


def batch_body(n: int, tag: str = "b") -> bytes:
    """A POST body of ``n`` seed-shaped events with distinct ids and users."""
    seed = seed_event()
    events = []
    for i in range(n):
        event = dict(seed)
        event["event_id"] = f"{tag}-{i}"
        event["user_id"] = f"user-{i % 97}"
        events.append(event)
    return json.dumps({"events": events}).encode()


@pytest.fixture(scope="session")
def body100() -> bytes:
    return batch_body(100)
