"""Snapshots of a partition's processing state, with the input offsets they cover.

A snapshot is written atomically (temporary file, fsync, rename, fsync of the
directory), so a reader finds the previous snapshot or the new one, whole.
Format: ``0xC1 'S'`` | version (u8) | msgpack of ``Snapshot``, whose ``state`` is
the processor's own versioned msgpack (evd.state.processor.PartitionState).

The store is an interface: a directory on local disk now (``<data_dir>/state``,
readable by whichever worker owns the partition next); shared storage for
process groups later.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from pathlib import Path

import msgspec

from evd.core.errors import EvdError
from evd.core.files import write_atomic

__all__ = ["DirectoryStore", "Snapshot", "SnapshotError", "SnapshotStore", "decode", "encode"]

MAGIC = b"\xc1S"
VERSION = 1


class SnapshotError(EvdError):
    """A snapshot that this evd cannot read (corrupt, or from a newer evd)."""


class Snapshot(msgspec.Struct):
    """One partition's state and where in the raw log it stands."""

    partition: int
    #: Epoch ms when it was taken.
    taken_at: int
    #: Writer id -> offset of the next raw record to read from its sub-log.
    offsets: dict[int, int]
    #: The processor's state, msgpack (decoded by the processor's own decoder).
    state: msgspec.Raw
    #: Stream (sessions, charts) -> writer id -> end of the partition's sub-log of it
    #: when the snapshot was taken: what was emitted after the state, from there on
    #: (a sub-log not named: from its start). None: not recorded (an older evd).
    outputs: dict[str, dict[int, int]] | None = None


_decoder = msgspec.msgpack.Decoder(Snapshot)
_encoder = msgspec.msgpack.Encoder()


def encode(snapshot: Snapshot) -> bytes:
    return MAGIC + bytes([VERSION]) + _encoder.encode(snapshot)


def decode(data: bytes) -> Snapshot:
    if data[:2] != MAGIC or len(data) < 3:
        raise SnapshotError("not an evd snapshot")
    if data[2] > VERSION:
        raise SnapshotError(f"snapshot version {data[2]} is newer than this evd reads ({VERSION})")
    try:
        return _decoder.decode(memoryview(data)[3:])
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"snapshot does not decode: {exc}") from None


class SnapshotStore(ABC):
    """Where partitions' latest snapshots are kept."""

    @abstractmethod
    async def load(self, partition: int) -> Snapshot | None:
        """The latest snapshot of ``partition``, or None."""

    @abstractmethod
    async def save(self, snapshot: Snapshot) -> None:
        """Replace the partition's latest snapshot, atomically and durably."""


class DirectoryStore(SnapshotStore):
    """Snapshots as files ``<root>/<partition:04d>.snapshot``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, partition: int) -> Path:
        return self.root / f"{partition:04d}.snapshot"

    async def load(self, partition: int) -> Snapshot | None:
        try:
            data = await asyncio.get_running_loop().run_in_executor(
                None, self.path(partition).read_bytes
            )
        except FileNotFoundError:
            return None
        return decode(data)

    async def save(self, snapshot: Snapshot) -> None:
        data = encode(snapshot)
        await asyncio.get_running_loop().run_in_executor(
            None, self._write, self.path(snapshot.partition), data
        )

    def _write(self, path: Path, data: bytes) -> None:
        os.makedirs(self.root, exist_ok=True)
        write_atomic(path, data)
