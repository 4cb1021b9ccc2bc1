"""Fixtures: evd server processes (stopped at teardown), a seeded random generator, and a
headless browser for the tests that render HTML."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from evdtest import ServerFactory
from screenshot import NoChromium, chromium

from bench.tansu import Broker

#: Set to 1 (CI does) to fail, rather than skip, the browser tests when no Chromium is found.
REQUIRE_BROWSER = "EVD_REQUIRE_BROWSER"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With EVD_TEST_WORKERS set, skip what that setting cannot change."""
    if not os.environ.get("EVD_TEST_WORKERS"):
        return
    skip = pytest.mark.skip(reason="workers_independent: ran in the pass without EVD_TEST_WORKERS")
    for item in items:
        if item.get_closest_marker("workers_independent") is not None:
            item.add_marker(skip)


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


@pytest.fixture
def browser() -> str:
    """The headless Chromium binary for a test that renders HTML.

    Without one the test is skipped, saying how to enable it, unless
    ``EVD_REQUIRE_BROWSER=1`` (set by .ci/run), in which case it fails.
    """
    try:
        return chromium()
    except NoChromium as exc:
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{exc} ({REQUIRE_BROWSER}=1 requires a browser)")
        pytest.skip("no Chromium on PATH: install it to run the browser tests "
                    f"(apt-get install -y chromium); set {REQUIRE_BROWSER}=1 to fail instead")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A Kafka-protocol broker (Tansu, memory storage) on a free loopback port, shared by
    the session: tests keep apart by topic prefix (see ``kafka_prefix``)."""
    broker = Broker(log_path=tmp_path_factory.mktemp("tansu") / "broker.log")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix (and consumer group prefix) of this test's own."""
    return f"t{abs(hash(request.node.nodeid)) % 10**10}.{os.getpid()}."
