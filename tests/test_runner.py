"""The runner's pieces that need no server: the state encoded a chunk at a time
equals the state encoded at once."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from evd.state import runner
from evd.state.charts import ChartsState
from evd.state.dedup import DedupState
from evd.state.processor import PartitionState
from evd.state.sessions import OpenSession, SessionTableState
from evd.state.watermark import WatermarkState

pytestmark = pytest.mark.workers_independent


def state(sessions: int, groups: int) -> PartitionState:
    return PartitionState(
        partition=1,
        dedup=DedupState(
            newest=5, groups=[(i, i, (f"id-{i}-a", f"id-{i}-b")) for i in range(groups)], seq=groups
        ),
        watermarks=WatermarkState(watermark=7, sources={0: 9}),
        buffer=[],
        sessions=SessionTableState(sessions=[
            OpenSession(f"u{i}", f"e{i}", i, i + 1, plays=[("spotify:track:x", i, 3, "skip")])
            for i in range(sessions)
        ]),
        charts=ChartsState(),
    )


@pytest.mark.parametrize("n", [0, 1, 15, 16, 2000, 2001, 65535, 65536, 70001])
async def test_chunked_encoding_equals_encoding_at_once(n: int) -> None:
    expected = msgspec.msgpack.encode(state(n, n // 2))
    got = await runner.encode_state(state(n, n // 2))
    assert bytes(got) == expected
    decoded = msgspec.msgpack.decode(bytes(got), type=PartitionState)
    assert len(decoded.sessions.sessions) == n and len(decoded.dedup.groups) == n // 2


async def test_the_loop_is_served_between_chunks() -> None:
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(other())
    await runner.encode_state(state(5 * runner.ENCODE_CHUNK, 0))
    task.cancel()
    assert turns >= 4
