"""Reading what the sinks delivered, for the end-to-end and fault tests: the
sqlite warehouse, the lake's files (NDJSON gzip/zstd/plain, Parquet), and the
generator of a realistic listening load."""

from __future__ import annotations

import gzip
import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from evdtest import track_id


def warehouse(data_dir: Path) -> sqlite3.Connection:
    """A read-only connection to the warehouse (WAL: readers never block the sink)."""
    path = data_dir / "warehouse.sqlite3"
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def query(data_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    path = data_dir / "warehouse.sqlite3"
    if not path.exists():
        return []
    conn = warehouse(data_dir)
    try:
        return list(conn.execute(sql, args))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def lake_rows(root: Path, stream: str) -> Iterator[dict[str, Any]]:
    """Every row of the lake's finished files of ``stream`` (hidden temp files are
    skipped, as Spark, DuckDB and Hive readers skip them)."""
    base = root / stream
    if not base.exists():
        return
    for path in sorted(base.rglob("*")):
        if not path.is_file() or path.name.startswith((".", "_")):
            continue
        yield from file_rows(path)


def file_rows(path: Path) -> Iterator[dict[str, Any]]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    if name.endswith(".gz"):
        data = gzip.decompress(path.read_bytes())
    elif name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    for line in data.splitlines():
        yield json.loads(line)


def wait_for(what: str, done: Callable[[], bool], timeout: float = 120.0, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def listening(
    rng: random.Random, users: int, n: int, start_ms: int, gap_ms: int, span_ms: int
) -> list[dict[str, Any]]:
    """``n`` events of ``users`` listeners over about ``span_ms`` from ``start_ms``, in
    time order but for users starting a new session (a jump past the gap): plays,
    pauses, resumes, seeks, skips, ends, events about another track."""
    from datetime import UTC, datetime

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")

    state: dict[str, tuple[str, int]] = {}
    last: dict[str, int] = {}
    out = []
    step = span_ms / n
    for i in range(n):
        t = start_ms + int(i * step)
        user = f"user-{rng.randrange(users)}"
        if user in last and last[user] <= t and rng.random() < 0.05:
            t_user = max(t, last[user] + gap_ms + 1)
        else:
            t_user = t
        last[user] = t_user
        kind = rng.choices(
            ["play", "pause", "resume", "seek", "skip", "end", "other"],
            [30, 10, 10, 10, 10, 10, 5],
        )[0]
        track, duration = state.get(user, (track_id(rng.randrange(50)), 200_000))
        if kind == "play" or user not in state:
            kind = "play"
            track, duration = track_id(rng.randrange(50)), rng.randint(60_000, 300_000)
            state[user] = (track, duration)
        if kind == "other":
            kind, track = "pause", track_id(1000 + rng.randrange(50))
        event: dict[str, Any] = {
            "event_id": f"ev-{i}",
            "event_type": kind,
            "timestamp": iso(t_user),
            "user_id": user,
            "track_id": track,
            "playback": {"position_ms": rng.randrange(duration), "duration_ms": duration},
        }
        if rng.random() < 0.9:
            event["geo"] = {"country": rng.choice(["US", "SE", "DE", "BR"])}
        if rng.random() < 0.8:
            event["device"] = {"os": rng.choice(["ios", "android", "web"])}
        out.append(event)
    return out
