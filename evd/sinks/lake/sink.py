"""The files sink: the data lake, hourly Hive-style directories that DuckDB,
Spark or BigQuery external tables read as they are.

Layout (``root``: ``path``, or ``{data_dir}/lake`` when it is "")::

    {root}/{stream}/dt=YYYY-MM-DD/hour=HH/part-w{worker:02d}-{epoch_ms}-{seq:06d}{ext}
    {root}/{stream}/dt=YYYY-MM-DD/hour=HH/_SUCCESS        the hour is complete
    {root}/_late/{stream}/dt=YYYY-MM-DD/hour=HH/part-...  rows that came after it
    {root}/_progress/{sink}/{stream}/p{partition:04d}.json  sessions/charts progress

Hours are UTC (evd.sinks.rows): events, late and dead letters by
``received_at``, sessions by ``started_at``, charts by ``window_start``.
``ext``: ``.ndjson.gz``, ``.ndjson.zst``, ``.ndjson`` or ``.parquet``
(evd.sinks.lake.formats). When an hour gets ``_SUCCESS``, and what happens
to rows that come after it: evd.sinks.lake.completeness.


Writes. Every ``write`` is one roll (the delivery loop's batch bounds are the
roll's size and age: 200,000 items, 64 MiB, 10 s by default for the lake):
one file per hour of the batch, written under a hidden temporary name in its
directory (``.part-...tmp``: Spark, DuckDB and Hive skip names starting with
``.`` or ``_``) and fsynced; then every file of the batch is renamed to its
final name and the directories are fsynced, and only then does ``write``
return (and the delivery loop commit). A reader never sees a partial file. A
write that fails removes what it wrote (temporary or renamed), so the retry
writes the batch once. Nothing is buffered between writes: ``flush`` has
nothing to do.

Crash bound. A SIGKILL during a write leaves only temporary files, which
``start`` removes (this worker's: ``.part-w{worker:02d}-*``); their rows are
read again from the committed offsets. The only rows the lake can hold twice
are those of the one batch whose files were renamed before its offsets were
committed: one loop writes one batch at a time, so at most one batch per
worker, ``batch.max_events`` items (plus the items of the record that crossed
the bound), in the files that batch wrote.

"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import orjson

from evd.core.config import BatchConfig, MiB, SinkConfig
from evd.core.errors import ConfigError, EvdError
from evd.core.files import fsync_dir, make_dirs, write_atomic
from evd.core.log import Stream
from evd.sinks import metrics, rows
from evd.sinks.base import Batch, Sink, SinkContext, SinkError
from evd.sinks.lake.completeness import (
    CHECK_INTERVAL_S,
    LATE_DIR,
    SUCCESS,
    Hours,
    hour_dirs,
    hour_path,
    read_progress,
)
from evd.sinks.lake.formats import Format, make_format

__all__ = ["FilesSink", "FilesSinkConfig"]

log = logging.getLogger(__name__)

#: Directories known to exist that a sink remembers (about a year of hours of
#: every stream); above it the memory is cleared and rebuilt as files are written.
MAX_KNOWN_DIRS = 20_000


def _lake_batch() -> BatchConfig:
    # A write is one file per hour and stream: bigger and rarer than the others'.
    return BatchConfig(max_events=200_000, max_bytes=64 * MiB, max_age_s=10.0)


class FilesSinkConfig(SinkConfig, tag="files", kw_only=True):
    """The data lake: Hive-style hourly directories of NDJSON (gzip/zstd) or Parquet."""

    streams: list[str] = msgspec.field(
        default_factory=lambda: [Stream.EVENTS, Stream.SESSIONS, Stream.CHARTS]
    )
    batch: BatchConfig = msgspec.field(default_factory=_lake_batch)
    #: Root of the lake ("": {data_dir}/lake).
    path: str = ""
    format: Literal["ndjson", "parquet"] = "ndjson"
    #: NDJSON compression (Parquet is always zstd).
    compression: Literal["gzip", "zstd", "none"] = "gzip"
    #: An hour gets its _SUCCESS marker this long after everything up to its end
    #: was delivered (stragglers after it go to the late layout).
    success_grace_s: float = 60.0

    def validate(self, where: str) -> None:
        if self.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise ConfigError(f"{where}.format: parquet needs pyarrow: pip install 'evd[parquet]'")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Staged(NamedTuple):
    """One file of a write: its temporary path and where it goes."""

    tmp: Path
    name: str
    hour: int
    items: int
    late: bool


class FilesSink(Sink):
    """The data lake (see the module docstring). ``late_rows``: rows written to
    the late layout since start (the ``evd_lake_late_rows`` counter)."""

    def __init__(
        self,
        cfg: FilesSinkConfig,
        ctx: SinkContext,
        *,
        check_interval_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.root = Path(cfg.path) if cfg.path else Path(ctx.data_dir) / "lake"
        self.grace_ms = int(cfg.success_grace_s * 1000)
        #: Seconds between worker 0's looks for complete hours.
        self.check_interval_s = (
            check_interval_s if check_interval_s is not None
            else max(0.5, min(CHECK_INTERVAL_S, cfg.success_grace_s))
        )
        #: Rows written to the late layout (their hour had _SUCCESS).
        self.late_rows = 0
        self._format: Format | None = None
        self._seq = 0
        #: Which hours have _SUCCESS; worker 0 marks complete ones.
        self.hours = Hours(self.root, cfg.name, cfg.streams, self.grace_ms, ctx)
        self._dirs: set[Path] = set()
        #: Progress saved / to save, per (stream, partition).
        self._saved: dict[tuple[str, int], int] = {}
        self._unsaved: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Check the format, create the root, remove this worker's temporary
        files left by a crash; worker 0 starts marking complete hours."""
        if self._closed:
            raise RuntimeError(f"files sink {self.cfg.name!r} is closed")
        self._format = make_format(self.cfg.format, self.cfg.compression, self.ctx.chart_window_ms)
        try:
            removed = await asyncio.to_thread(self._clean)
        except OSError as exc:
            raise SinkError(f"lake {self.root}: {exc}") from exc
        if removed:
            log.info("lake %s: removed %d temporary files of an interrupted write", self.root, removed)
        if self.ctx.worker == 0:
            task = asyncio.create_task(self._check_forever(), name=f"lake-{self.cfg.name}-success")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._started = True

    def _clean(self) -> int:
        """Create the root; remove this worker's temporary files (and worker 0's
        unfinished markers). Runs in a thread."""
        self._makedirs(self.root)
        prefix = f".part-w{self.ctx.worker:02d}-"
        removed = 0
        for base in (self.root, self.root / LATE_DIR):
            for stream in self.streams:
                for directory in hour_dirs(base / stream):
                    with os.scandir(directory) as it:
                        names = [e.name for e in it]
                    for name in names:
                        if (name.startswith(prefix) and name.endswith(".tmp")) or (
                            self.ctx.worker == 0 and name == SUCCESS + ".tmp"
                        ):
                            os.unlink(directory / name)
                            removed += 1
        return removed

    async def flush(self) -> None:
        """Nothing to do: every file is durable when write returns."""

    async def close(self) -> None:
        """Stop marking hours (worker 0)."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        parquet = self.cfg.format == "parquet"
        return {
            "path": str(self.root),
            "format": self.cfg.format,
            "compression": "zstd" if parquet else self.cfg.compression,
        }

    # -- writing ---------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Write one file per hour of ``batch`` (none for an hour without rows),
        all renamed into place before it returns; save the progress it carries."""
        if self._closed:
            raise RuntimeError(f"files sink {self.cfg.name!r}: write after close()")
        if not self._started:
            raise RuntimeError(f"files sink {self.cfg.name!r}: write before start()")
        try:
            late = await asyncio.to_thread(self._write, batch)
        except OSError as exc:
            self._dirs.clear()  # a directory may have gone (removed by hand)
            raise SinkError(f"lake {self.root}: {exc}") from exc
        if late:
            self.late_rows += late
            metrics.LAKE_LATE_ROWS.inc(late)
            log.warning(
                "lake %s: %d %s rows came after their hour's _SUCCESS; written to %s",
                self.root, late, batch.stream, self.root / LATE_DIR,
            )

    def _write(self, batch: Batch) -> int:
        """The write, in a thread; returns the rows that went to the late layout."""
        fmt = self._format
        assert fmt is not None
        stream = batch.stream
        staged: list[_Staged] = []
        renamed: list[Path] = []
        try:
            for hour, group in rows.by_hour(batch).items():
                if not group.count:
                    continue
                late = self.hours.is_marked(stream, hour)
                directory = self._dir(stream, hour, late)
                self._makedirs(directory)
                self._seq = (self._seq + 1) % 1_000_000
                name = f"part-w{self.ctx.worker:02d}-{_now_ms()}-{self._seq:06d}{fmt.ext}"
                tmp = directory / f".{name}.tmp"
                staged.append(_Staged(tmp, name, hour, group.count, late))
                with open(tmp, "xb") as f:
                    fmt.write(f, group)
                    f.flush()
                    os.fsync(f.fileno())
            synced: set[Path] = set()
            late_rows = 0
            for s in staged:
                late = s.late
                if not late and self.hours.is_marked(stream, s.hour):
                    late = True  # marked while this file was written: never into it
                    self._makedirs(self._dir(stream, s.hour, True))
                final = self._dir(stream, s.hour, late) / s.name
                os.rename(s.tmp, final)
                renamed.append(final)
                synced.add(final.parent)
                if late:
                    late_rows += s.items
            for directory in synced:
                fsync_dir(directory)
        except BaseException:
            for path in [*renamed, *(s.tmp for s in staged)]:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            raise
        self._save_progress(batch)
        return late_rows

    def _dir(self, stream: str, hour: int, late: bool) -> Path:
        base = self.root / LATE_DIR if late else self.root
        return base / stream / hour_path(hour)

    def _makedirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents, each entry made durable."""
        if directory in self._dirs:
            return
        for parent in make_dirs(directory):
            fsync_dir(parent)
        if len(self._dirs) >= MAX_KNOWN_DIRS:
            self._dirs.clear()
        self._dirs.add(directory)

    # -- progress (sessions, charts) -----------------------------------------------------

    def _note_progress(self, batch: Batch) -> None:
        """Remember the newest progress per partition that ``batch`` carries."""
        stream = batch.stream
        found: dict[int, int] = {}
        if stream == Stream.CHARTS:
            # final_until, not closed_until: a closed window may still be revised
            # by late plays until it is past the allowed lateness.
            for b in batch.values:
                if b.final_until is not None:
                    p = b.partition
                    found[p] = max(found.get(p, b.final_until), b.final_until)
        elif stream == Stream.SESSIONS:
            for b, p in zip(batch.values, batch.partitions, strict=True):
                if b.complete_until is not None:
                    found[p] = max(found.get(p, b.complete_until), b.complete_until)
        for p, until in found.items():
            key = (stream, p)
            if until > self._unsaved.get(key, -1) and until > self._saved_progress(key):
                self._unsaved[key] = until

    def _saved_progress(self, key: tuple[str, int]) -> int:
        saved = self._saved.get(key)
        if saved is None:
            found = read_progress(self.hours.progress_path(*key))
            saved = self._saved[key] = -1 if found is None else found
        return saved

    def _save_progress(self, batch: Batch) -> None:
        """Save the progress ``batch`` carries (and any a failure left unsaved),
        after its files are renamed. A failure is logged, not raised (the batch
        is written: a retry would write it twice), and the progress kept for
        the next write: only the marker waits."""
        try:
            self._note_progress(batch)
            for key, until in sorted(self._unsaved.items()):
                path = self.hours.progress_path(*key)
                self._makedirs(path.parent)
                write_atomic(path, orjson.dumps({"until": until}))
                self._saved[key] = until
                del self._unsaved[key]
        except OSError as exc:
            log.warning("lake %s: progress not saved (%s); saved at the next write", self.root, exc)

    # -- _SUCCESS ------------------------------------------------------------------------

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            try:
                await self.mark_complete_hours(_now_ms())
            except (OSError, EvdError) as exc:
                log.warning("lake %s: looking for complete hours failed: %s", self.root, exc)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lake %s: the _SUCCESS task died", self.root, exc_info=task.exception())

    async def mark_complete_hours(self, now_ms: int) -> list[Path]:
        """Give ``_SUCCESS`` to every hour of the sink's streams that has a data
        file and is complete at ``now_ms`` (evd.sinks.lake.completeness); the
        markers made."""
        return await self.hours.mark_complete_hours(now_ms)
