"""Durable file operations every stage uses: a directory's entries made durable,
a file replaced atomically (the log's offsets, snapshots, the lake's markers)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["fsync_dir", "make_dirs", "write_atomic", "write_atomic_all"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic_all(writes: Iterable[tuple[Path, bytes]]) -> None:
    """``write_atomic`` of each (path, data), with one fsync per directory: every
    file is replaced atomically, and all of them are durable when it returns."""
    staged: list[tuple[Path, Path]] = []
    for path, data in writes:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        staged.append((tmp, path))
    for tmp, path in staged:
        os.replace(tmp, path)
    for directory in {path.parent for _, path in staged}:
        fsync_dir(directory)


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents (another process may create them too);
    the directories whose entries changed, for the caller to fsync."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
    return [directory.parent for directory in reversed(missing)]
