"""What the supervisor and its workers share: which workers are up, how often each restarted.

A small file, ``<data_dir>/run/host.bin``, mapped into every process of one
server. The supervisor creates it before starting workers and is the only one
to write the restart counts; a worker marks itself up once its log is
recovered and it listens, and the supervisor marks it down when it exits. Only
these flags and counts travel through it, never event data.

Layout: ``<u32 magic><u32 workers>`` then, per worker, ``<u8 up><3 pad><u32
restarts>``. One-byte and aligned four-byte stores are atomic on every
platform evd runs on, so readers need no lock.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

__all__ = ["RUN_DIR", "HostState", "run_dir"]

RUN_DIR = "run"
FILE = "host.bin"
MAGIC = 0x65766468  # "evdh"
HEAD = struct.Struct("<II")
SLOT = struct.Struct("<B3xI")
COUNT = struct.Struct("<I")


def run_dir(data_dir: str | Path) -> Path:
    """Where one server's processes keep what they share (recreated at every start)."""
    return Path(data_dir) / RUN_DIR


class HostState:
    """The workers' up flags and restart counts, shared through a mapped file."""

    def __init__(self, buf: mmap.mmap | bytearray, workers: int) -> None:
        self._buf = buf
        self.workers = workers

    @classmethod
    def create(cls, directory: Path, workers: int) -> HostState:
        """The supervisor's: a fresh file with every worker down."""
        directory.mkdir(parents=True, exist_ok=True)
        size = HEAD.size + SLOT.size * workers
        path = directory / FILE
        tmp = path.with_name(FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(HEAD.pack(MAGIC, workers) + bytes(size - HEAD.size))
        os.replace(tmp, path)
        return cls.attach(directory)

    @classmethod
    def attach(cls, directory: Path) -> HostState:
        """A worker's view of the supervisor's file."""
        with open(directory / FILE, "r+b") as f:
            buf = mmap.mmap(f.fileno(), 0)
        magic, workers = HEAD.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ValueError(f"{directory / FILE} is not an evd host state file")
        return cls(buf, workers)

    @classmethod
    def alone(cls) -> HostState:
        """One worker without a supervisor (tests, tools): itself, up."""
        state = cls(bytearray(HEAD.size + SLOT.size), 1)
        HEAD.pack_into(state._buf, 0, MAGIC, 1)
        state.set_up(0, True)
        return state

    def _at(self, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise IndexError(f"worker {worker} out of range 0..{self.workers - 1}")
        return HEAD.size + SLOT.size * worker

    def up(self, worker: int) -> bool:
        return self._buf[self._at(worker)] == 1

    def set_up(self, worker: int, up: bool) -> None:
        self._buf[self._at(worker)] = 1 if up else 0

    def all_up(self) -> bool:
        return all(self.up(k) for k in range(self.workers))

    def restarts(self, worker: int) -> int:
        return int(COUNT.unpack_from(self._buf, self._at(worker) + 4)[0])

    def add_restart(self, worker: int) -> None:
        """Supervisor only (the one writer of the counts)."""
        COUNT.pack_into(self._buf, self._at(worker) + 4, self.restarts(worker) + 1)

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
