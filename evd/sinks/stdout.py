"""stdout: every item as one NDJSON line on standard output, for debugging and pipes.

Rows are those of evd.sinks.rows. With several workers, each writes whole
batches with one ``write`` call each, so lines never interleave mid-line.
"""

from __future__ import annotations

import asyncio
import os
import sys

from evd.core.config import SinkConfig
from evd.sinks import rows
from evd.sinks.base import Batch, Sink, SinkContext, SinkError

__all__ = ["StdoutSink", "StdoutSinkConfig"]


class StdoutSinkConfig(SinkConfig, tag="stdout", kw_only=True):
    """NDJSON lines on standard output, for debugging and pipes."""


class StdoutSink(Sink):
    """NDJSON lines on file descriptor 1."""

    def __init__(self, cfg: StdoutSinkConfig, ctx: SinkContext, fd: int | None = None) -> None:
        self.cfg = cfg
        self.window_ms = ctx.chart_window_ms
        self.fd = sys.stdout.fileno() if fd is None else fd

    async def write(self, batch: Batch) -> None:
        if not batch.count:
            return
        data = rows.json_lines(batch, self.window_ms)
        try:
            await asyncio.to_thread(_write_all, self.fd, data)
        except OSError as exc:
            raise SinkError(f"stdout: {exc.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
