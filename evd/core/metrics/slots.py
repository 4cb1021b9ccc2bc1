"""The slots a worker counts into, their layout, and the files that share them.

Every number a worker counts lives in a fixed slot of one array of 8-byte
values (``HOT.counts``, with ``HOT.floats`` the same bytes read as doubles for
the sums). Under a supervisor that array is the file
``<run_dir>/metrics/w<k>.bin`` (``worker_file``), mapped shared into worker
``k``, its only writer (``open_own``); the others read it at scrape time
(``read``). Without a run dir the array is a private bytearray.

An update is one aligned 8-byte store into the array, which readers on other
cores see at once; aligned 8-byte loads and stores do not tear, so nobody
locks. Every update runs on the worker's event loop thread (one writer per
slot), so the read-modify-write of ``+=`` needs no lock either.

The layout: each metric declares its slots under its name when the module that
declares it is imported (``LAYOUT.declare``). Until the layout is sealed a
declaration takes the next free slots, so a tool or a test counts before any
scrape. ``seal`` (the first ``start_worker``, ``render``, ``open_own`` or
``read`` calls it) orders the declarations by name, moves what was counted so
far to the final slots, and fixes the size; a declaration after that raises
LayoutError. Ordering by name makes the layout a function of which metrics are
declared, not of the order their modules were imported in: every process of
the same code that imported the same stages lays its file out alike. Slot 0 of
every file holds a magic made of the layout's names and sizes, so a file of
another layout is never read as this one.
"""

from __future__ import annotations

import mmap
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from evd.core.errors import EvdError

__all__ = [
    "HOT",
    "LAYOUT",
    "METRICS_DIR",
    "Declaration",
    "Layout",
    "LayoutError",
    "Sealed",
    "Slots",
    "View",
    "open_own",
    "read",
    "seal",
    "worker_file",
]

METRICS_DIR = "metrics"
#: High half of every file's magic: "evdm".
_MAGIC_HIGH = 0x6576646D << 32

#: One worker's slots as read at a scrape: (counts, the same values as doubles).
View = tuple[list[int], list[float]]


class LayoutError(EvdError):
    """A metric was declared twice, or after the layout was sealed."""


class Declaration(Protocol):
    """What a metric tells the layout.

    ``size`` slots from its first one; ``float_slots`` are the offsets among
    them that hold doubles (summed as doubles); ``resets``: the slots mean
    something only while their worker runs and are zeroed when it (re)starts.
    ``place`` is told the first slot, at declaration and again at sealing; the
    metric counts from there until told otherwise.
    """

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def float_slots(self) -> Sequence[int]: ...

    @property
    def resets(self) -> bool: ...

    def place(self, first: int) -> None: ...


class Slots:
    """One worker's counts: ``counts`` (int64) and ``floats`` (double) over one buffer.

    The hot path writes them directly (``HOT.counts[slot] += n``) or through a
    metric's methods; both are single stores into the buffer.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer: mmap.mmap | bytearray = bytearray(size * 8)
        self.counts = memoryview(self.buffer).cast("q")
        self.floats = memoryview(self.buffer).cast("d")

    def use(self, buffer: mmap.mmap | bytearray) -> mmap.mmap | bytearray:
        """Count into ``buffer`` from now on; returns the buffer used so far."""
        old = self.buffer
        self.counts.release()
        self.floats.release()
        self.buffer = buffer
        self.counts = memoryview(buffer).cast("q")
        self.floats = memoryview(buffer).cast("d")
        return old

    def resize(self, size: int, moves: Sequence[tuple[int, int, int]] = ()) -> None:
        """Count into a private buffer of ``size`` slots from now on, holding the
        current counts: each ``(old, new, n)`` of ``moves`` copies ``n`` slots
        from ``old`` to ``new``; without moves the first slots stay in place."""
        new = bytearray(size * 8)
        if not moves:
            keep = min(size, self.size) * 8
            new[:keep] = self.buffer[:keep]
        for old, first, n in moves:
            new[first * 8: (first + n) * 8] = self.buffer[old * 8: (old + n) * 8]
        self.size = size
        self.use(new)


@dataclass(frozen=True)
class Sealed:
    """The fixed layout: its size in slots, the magic in slot 0, the file size,
    each metric's (name, first slot) in slot order, the slots that hold doubles
    and those zeroed when a worker (re)starts."""

    size: int
    magic: int
    file_size: int
    places: tuple[tuple[str, int], ...]
    float_slots: tuple[int, ...]
    reset_slots: tuple[int, ...]


class Layout:
    """Hands out slot numbers (slot 0 holds the file's magic) and seals them."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.sealed: Sealed | None = None
        #: Every declaration with its first slot, in declaration order.
        self._declared: list[tuple[Declaration, int]] = []
        self._names: set[str] = set()
        self._size = 1

    def declare(self, metric: Declaration) -> None:
        """Give ``metric`` its slots (the next free ones until sealing)."""
        if self.sealed is not None:
            raise LayoutError(
                f"metric {metric.name} declared after the metrics layout was sealed (by the "
                "first start_worker, render or file access): import the module that declares "
                "it before"
            )
        if metric.name in self._names:
            raise LayoutError(f"metric {metric.name} declared twice")
        self._names.add(metric.name)
        first = self._size
        self._size += metric.size
        self._declared.append((metric, first))
        self.slots.resize(self._size)
        metric.place(first)

    def seal(self) -> Sealed:
        """Fix the layout (once; later calls return it): declarations in the
        order of their names, the counts so far moved with them."""
        if self.sealed is not None:
            return self.sealed
        moves: list[tuple[int, int, int]] = []
        floats: list[int] = []
        resets: list[int] = []
        places: list[tuple[str, int]] = []
        first = 1
        for metric, old in sorted(self._declared, key=lambda d: d[0].name):
            moves.append((old, first, metric.size))
            places.append((metric.name, first))
            floats += [first + i for i in metric.float_slots]
            if metric.resets:
                resets += range(first, first + metric.size)
            metric.place(first)
            first += metric.size
        signature = ";".join(
            f"{m.name}:{m.size}:{','.join(map(str, m.float_slots))}:{int(m.resets)}"
            for m, _ in sorted(self._declared, key=lambda d: d[0].name)
        )
        magic = _MAGIC_HIGH | zlib.crc32(f"{first}|{signature}".encode())
        self.slots.resize(first, moves)
        self.slots.counts[0] = magic
        self.sealed = Sealed(
            size=first,
            magic=magic,
            file_size=-(-first * 8 // mmap.PAGESIZE) * mmap.PAGESIZE,
            places=tuple(places),
            float_slots=tuple(floats),
            reset_slots=tuple(resets),
        )
        return self.sealed


#: This process's counts; every metric writes here.
HOT = Slots(1)
LAYOUT = Layout(HOT)


def seal() -> Sealed:
    """Fix this process's layout (see Layout.seal)."""
    return LAYOUT.seal()


def worker_file(run_dir: Path, index: int) -> Path:
    """Where worker ``index`` keeps its counts."""
    return run_dir / METRICS_DIR / f"w{index}.bin"


def open_own(path: Path) -> mmap.mmap:
    """Map ``path`` read-write, keeping its counts if it holds this layout."""
    layout = seal()
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                if os.fstat(fd).st_size == layout.file_size:
                    mm = mmap.mmap(fd, layout.file_size)
                    if memoryview(mm)[:8].cast("q")[0] == layout.magic:
                        return mm
                    mm.close()
            finally:
                os.close(fd)
        # Missing or of another layout: a fresh file, complete before its name appears.
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(layout.magic.to_bytes(8, "little", signed=True) + bytes(layout.file_size - 8))
        os.replace(tmp, path)
    raise OSError(f"{path}: cannot map the metrics file")


def read(path: Path) -> View | None:
    """Another worker's counts (None while it has no file of this layout)."""
    layout = seal()
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != layout.file_size:
                return None
            mm = mmap.mmap(f.fileno(), layout.file_size, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        return None
    try:
        # Item by item through the memoryview: each value is one aligned 8-byte load.
        with memoryview(mm) as view, view.cast("q") as q, view.cast("d") as d:
            counts = q[: layout.size].tolist()
            floats = cast(list[float], d[: layout.size].tolist())
        return (counts, floats) if counts[0] == layout.magic else None
    finally:
        mm.close()
