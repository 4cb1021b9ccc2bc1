"""The audit ledger: what each stage counted, committed with the offsets it covers.

``{data_dir}/audit.sqlite3`` holds, per UTC hour, stream, event type, stage
(``audit``, which counts what the edge and the processors did, or a sink's
name) and metric (``accepted``, ``rejected``, ``duplicate``, ``late`` for the
audit stage; ``delivered``, ``dead_lettered``, ``filtered`` for sinks), a count; and per stage the log offsets those counts cover.
Counts and offsets change in one transaction, and a stage that restarts
resumes from the ledger's offsets, so every record is counted exactly once
even though a sink may deliver it twice (a crash between its write and its
commit). Several workers share the file: WAL mode, short transactions, a busy
timeout.

Each stage also keeps, per events partition and raw sub-log, the newest raw
offset it has taken from the ``events``/``late`` streams (``seen``): records a
processor emits again while it replays after a crash carry raw offsets at or
below it and are skipped (evd.core.schema.EventsBatch.raw_offset).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from evd.core.log import SubLog

__all__ = ["AUDIT_FILE", "CountKey", "Ledger", "SeenKey", "read_counts", "read_stages"]

AUDIT_FILE = "audit.sqlite3"
#: How long a ledger write waits for another worker's transaction.
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts (
    hour INTEGER NOT NULL, stream TEXT NOT NULL, event_type TEXT NOT NULL,
    stage TEXT NOT NULL, metric TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (hour, stream, event_type, stage, metric)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    stage TEXT NOT NULL, stream TEXT NOT NULL, partition INTEGER NOT NULL,
    source INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (stage, stream, partition, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    stage TEXT NOT NULL, stream TEXT NOT NULL, partition INTEGER NOT NULL,
    raw_source INTEGER NOT NULL, raw_offset INTEGER NOT NULL,
    PRIMARY KEY (stage, stream, partition, raw_source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY, kind TEXT NOT NULL, streams TEXT NOT NULL,
    event_types TEXT
);
"""


class CountKey(NamedTuple):
    hour: int
    stream: str
    event_type: str
    metric: str


class SeenKey(NamedTuple):
    stream: str
    partition: int
    raw_source: int


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a ledger commit is durable before the log offsets are committed after it.
    conn.execute("PRAGMA synchronous=FULL")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)  # IF NOT EXISTS: workers may race to create
    return conn


class Ledger:
    """One worker's handle on the ledger; every call runs in its own thread."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / AUDIT_FILE
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="evd-ledger")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = _connect(self.path)
        return self._conn

    async def register(
        self, stage: str, kind: str, streams: list[str], event_types: list[str] | None
    ) -> None:
        """Say what ``stage`` consumes (the report compares sinks of ``events``)."""
        row = (stage, kind, orjson.dumps(streams).decode(),
               None if event_types is None else orjson.dumps(event_types).decode())
        await self._run(self._register, row)

    def _register(self, row: tuple[Any, ...]) -> None:
        self._db().execute(
            "INSERT INTO stages VALUES (?, ?, ?, ?) ON CONFLICT (stage) DO UPDATE SET"
            " kind = excluded.kind, streams = excluded.streams, event_types = excluded.event_types",
            row,
        )

    async def offsets(self, stage: str) -> tuple[dict[SubLog, int], dict[SeenKey, int]]:
        """The offsets ``stage`` committed, and the raw offsets it has seen."""
        result: tuple[dict[SubLog, int], dict[SeenKey, int]] = await self._run(
            self._offsets, stage
        )
        return result

    def _offsets(self, stage: str) -> tuple[dict[SubLog, int], dict[SeenKey, int]]:
        db = self._db()
        offsets = {
            SubLog(stream, partition, source): offset
            for stream, partition, source, offset in db.execute(
                "SELECT stream, partition, source, next_offset FROM offsets WHERE stage = ?",
                (stage,),
            )
        }
        seen = {
            SeenKey(stream, partition, source): offset
            for stream, partition, source, offset in db.execute(
                "SELECT stream, partition, raw_source, raw_offset FROM seen WHERE stage = ?",
                (stage,),
            )
        }
        return offsets, seen

    async def commit(
        self,
        stage: str,
        counts: Mapping[CountKey, int],
        offsets: Mapping[SubLog, int],
        seen: Mapping[SeenKey, int],
    ) -> None:
        """Add ``counts`` and move ``stage``'s offsets, in one transaction."""
        await self._run(self._commit, stage, dict(counts), dict(offsets), dict(seen))

    def _commit(
        self,
        stage: str,
        counts: dict[CountKey, int],
        offsets: dict[SubLog, int],
        seen: dict[SeenKey, int],
    ) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO counts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET n = n + excluded.n",
                [(k.hour, k.stream, k.event_type, stage, k.metric, n) for k, n in counts.items()
                 if n],
            )
            db.executemany(
                "INSERT INTO offsets VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET next_offset = excluded.next_offset",
                [(stage, s.stream, s.partition, s.source, o) for s, o in offsets.items()],
            )
            db.executemany(
                "INSERT INTO seen VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET raw_offset = max(raw_offset, excluded.raw_offset)",
                [(stage, k.stream, k.partition, k.raw_source, o) for k, o in seen.items()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)


def read_counts(
    data_dir: str | Path, hour: int | None = None
) -> list[tuple[int, str, str, str, str, int]]:
    """Rows (hour, stream, event_type, stage, metric, n), for one hour or all."""
    path = Path(data_dir) / AUDIT_FILE
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        sql = "SELECT hour, stream, event_type, stage, metric, n FROM counts"
        args: tuple[Any, ...] = ()
        if hour is not None:
            sql += " WHERE hour = ?"
            args = (hour,)
        return list(conn.execute(sql + " ORDER BY hour, stream, event_type, stage, metric", args))
    finally:
        conn.close()


def read_stages(data_dir: str | Path) -> dict[str, tuple[str, list[str], list[str] | None]]:
    """stage -> (kind, streams, event_types) as the stages registered themselves."""
    path = Path(data_dir) / AUDIT_FILE
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        return {
            stage: (kind, orjson.loads(streams), None if types is None else orjson.loads(types))
            for stage, kind, streams, types in conn.execute(
                "SELECT stage, kind, streams, event_types FROM stages"
            )
        }
    finally:
        conn.close()
