"""The embedded log on disk as a whole: reading a sub-log from another process,
the one-time upgrade from the single-writer layout, and recovery of writers that will not run.

Run before the workers start (the supervisor does), or from tools (``evd log-read``);
none of it needs an event loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from evd.core.errors import ConfigError
from evd.core.files import fsync_dir, make_dirs
from evd.core.log import Record
from evd.core.log.embedded.journal import DIRNAME as JOURNAL_DIR
from evd.core.log.embedded.journal import SUFFIX as JOURNAL_SUFFIX
from evd.core.log.embedded.sublog import (
    SEGMENT_SUFFIX,
    Segments,
    parse_writer,
    sublog_dir,
    writer_name,
)

__all__ = ["old_layout", "partition_dirs", "read_partition", "upgrade_layout", "writers_on_disk"]

log = logging.getLogger(__name__)


def read_partition(
    root: str | Path,
    stream: str,
    partition: int,
    offset: int = 0,
    max_bytes: int = 1 << 20,
    *,
    writer: int = 0,
) -> list[Record]:
    """Records of writer ``writer``'s sub-log of a partition, for tools in another process.

    Reads every whole frame on disk and stops at the first incomplete or
    corrupt one, which may be an append still in flight; for a reader that must
    not go past the published durable end, use evd.core.sublog.SubLogReader.
    An ``offset`` before the oldest retained segment (0: from the beginning)
    reads from that segment on: what retention deleted is gone.
    """
    directory = sublog_dir(Path(root) / "log", stream, partition, writer)
    if not directory.is_dir():
        return []
    segments = Segments(directory)
    try:
        offset = max(offset, segments.bases[0])
        last = segments.bases[-1]
        path = segments.path(last)
        end = last + (path.stat().st_size if path.exists() else 0)
        return segments.read(offset, end, max_bytes, strict=False)
    finally:
        segments.close()


def partition_dirs(log_root: Path) -> list[tuple[str, int, Path]]:
    """(stream, partition, directory) of every partition directory, of any writer."""
    return [
        (stream_dir.name, int(part_dir.name), part_dir)
        for stream_dir in sorted(p for p in log_root.iterdir() if p.is_dir())
        if not stream_dir.name.startswith("_")
        for part_dir in sorted(stream_dir.iterdir())
        if part_dir.name.isdigit() and part_dir.is_dir()
    ]


def _old_files(log_root: Path, found: list[tuple[str, int, Path]]) -> list[tuple[Path, Path]]:
    """(file, directory it belongs in) for each file of the single-writer layout."""
    moves: list[tuple[Path, Path]] = []
    writer0 = writer_name(0)
    for _, _, part_dir in found:
        moves += [
            (path, part_dir / writer0)
            for path in sorted(part_dir.iterdir())
            if path.name.endswith(SEGMENT_SUFFIX) and path.is_file()
        ]
    journal_dir = log_root / JOURNAL_DIR
    if journal_dir.is_dir():
        moves += [
            (path, journal_dir / writer0)
            for path in sorted(journal_dir.iterdir())
            if path.name.endswith(JOURNAL_SUFFIX) and path.is_file()
        ]
    return moves


def old_layout(log_root: Path, found: list[tuple[str, int, Path]]) -> bool:
    return bool(_old_files(log_root, found))


def upgrade_layout(data_dir: str | Path) -> int:
    """Move a single-writer data_dir's files into writer 0's place; files moved.

    Segments directly in ``<stream>/<partition>/`` go to ``.../w000/`` and
    journal files directly in ``_journal/`` to ``_journal/w000/``, keeping
    their names (so offsets and journal entries stay valid); each directory is
    fsynced after. Idempotent, and safe to run again after a crash part way
    (a file is renamed, never copied). Refuses (ConfigError) when a file of
    the same name is already in writer 0's place.
    """
    log_root = Path(data_dir) / "log"
    if not log_root.is_dir():
        return 0
    moves = _old_files(log_root, partition_dirs(log_root))
    touched: dict[Path, None] = {}
    for path, target_dir in moves:
        target = target_dir / path.name
        if target.exists():
            raise ConfigError(
                f"cannot upgrade the log layout: {path} and {target} both exist"
            )
        for parent in make_dirs(target_dir):
            touched[parent] = None
        os.rename(path, target)
        touched[target_dir] = None
        touched[path.parent] = None
    for directory in touched:
        fsync_dir(directory)
    if moves:
        log.info("log layout upgraded: %d files of %s moved to writer 0", len(moves), log_root)
    return len(moves)


def writers_on_disk(data_dir: str | Path) -> list[int]:
    """Every writer id that has a journal directory or a sub-log under ``data_dir``."""
    log_root = Path(data_dir) / "log"
    if not log_root.is_dir():
        return []
    dirs = [log_root / JOURNAL_DIR] + [d for _, _, d in partition_dirs(log_root)]
    found: set[int] = set()
    for directory in dirs:
        if not directory.is_dir():
            continue
        for child in directory.iterdir():
            writer = parse_writer(child.name)
            if writer is not None and child.is_dir():
                found.add(writer)
    return sorted(found)
