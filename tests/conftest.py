"""Fixtures: evd server processes (stopped at teardown) and a seeded random generator."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from evdtest import ServerFactory


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``evd serve`` processes for one test; all are stopped (killed if stuck) after it."""
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like ``servers``, shared by the tests of one module."""
    factory = ServerFactory(tmp_path_factory.mktemp("evd"))
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def rng() -> random.Random:
    """A random generator whose seed is printed (shown when the test fails).

    Rerun a failure with ``EVD_TEST_SEED=<seed>``.
    """
    seed = int(os.environ.get("EVD_TEST_SEED") or random.randrange(2**32))
    print(f"random seed: {seed} (rerun with EVD_TEST_SEED={seed})")
    return random.Random(seed)
