"""Shared inputs: batches of seed-shaped events with unique ids."""

from __future__ import annotations

import pytest

from bench.seedload import batch_body as seed_batch_body


def batch_body(n: int, tag: str = "b") -> bytes:
    """A POST body of ``n`` seed-shaped events with distinct ids and users."""
    return seed_batch_body(n, tag, lambda i: f"user-{i % 97}")


@pytest.fixture(scope="session")
def body100() -> bytes:
    return batch_body(100)
