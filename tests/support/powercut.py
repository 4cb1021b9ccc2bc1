"""A power cut, simulated: which bytes of each file an fsync made durable.

``python tests/support/powercut.py RECORD serve ...`` runs ``evd`` with ``os.fsync``
wrapped: every fsync of a regular file appends ``<size>\\t<path>`` to RECORD
once it returned, where size is the file's size before the fsync began (all of
which that fsync made durable). After the process is killed, ``cut_power``
truncates every file to the size its last fsync covered (0 if none did): what
the disk would hold after a power cut that dropped every unsynced byte.

Worker processes (multiprocessing "spawn") import this file again as their
main module: the record's path travels in the environment (RECORD_ENV), and
the import wraps their fsync too.

A simplification: files created or deleted since their directory's last fsync
are kept or stay deleted, which a real power cut may not do. ``os.replace`` is
wrapped too, so that a file written atomically (temp, fsync, rename) keeps
what its fsync covered under its new name.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

#: Where the record goes, for the worker processes the server spawns.
RECORD_ENV = "POWERCUT_RECORD"


def record_fsyncs(record: str) -> None:
    """Wrap ``os.fsync`` so that every fsync of a regular file is recorded."""
    out = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    real_fsync = os.fsync
    real_replace = os.replace
    #: What this process's fsyncs covered, per path: a rename carries it along.
    synced: dict[str, int] = {}

    def note(size: int, path: str) -> None:
        synced[path] = size
        # One write of one short line to an O_APPEND file: lines of the
        # fsync threads never interleave.
        os.write(out, f"{size}\t{path}\n".encode())

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        real_fsync(fd)
        if stat.S_ISREG(st.st_mode):
            note(st.st_size, os.readlink(f"/proc/self/fd/{fd}"))

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        # An atomic write (temp, fsync, rename): the synced bytes now have dst's name.
        real_replace(src, dst, **kw)
        size = synced.pop(os.path.abspath(src), None)
        if size is not None:
            note(size, os.path.abspath(dst))

    os.fsync = fsync
    os.replace = replace  # type: ignore[assignment]


if __name__ == "__mp_main__" and RECORD_ENV in os.environ:
    record_fsyncs(os.environ[RECORD_ENV])  # a worker process of the server


def cut_power(root: Path, record: Path) -> dict[Path, int]:
    """Truncate every file under ``root`` to what its last fsync covered; bytes lost per file."""
    synced: dict[str, int] = {}
    if record.exists():
        for line in record.read_text().splitlines():
            size, path = line.split("\t", 1)
            synced[path] = int(size)
    lost = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        keep = synced.get(str(path.resolve()), 0)
        size = path.stat().st_size
        if size > keep:
            os.truncate(path, keep)
            lost[path] = size - keep
    return lost


if __name__ == "__main__":
    os.environ[RECORD_ENV] = sys.argv[1]
    record_fsyncs(sys.argv[1])
    from evd.cli import main

    sys.exit(main(sys.argv[2:]))
