"""Back-pressure for one HTTP connection.

Reading pauses while either the transport's write buffer is above its limit
(the client is not reading its responses) or too many pipelined requests wait
for their responses; it resumes once both have drained below the low marks.
"""

from __future__ import annotations

import asyncio

#: Pipelined requests one connection may have waiting for a response. Bounds the
#: decoded bodies and pending log appends a single client can pin in memory.
HIGH_WATER_REQUESTS = 32
#: Reading resumes when this few requests are still waiting.
LOW_WATER_REQUESTS = 8
#: Bytes of unsent responses above which the transport calls pause_writing.
WRITE_HIGH_WATER = 256 * 1024


class FlowControl:
    """Pauses and resumes reading on one transport."""

    __slots__ = ("_in_flight", "_reading_paused", "_transport", "_writing_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reading_paused = False
        self._writing_paused = False
        self._in_flight = 0
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def request_started(self) -> None:
        """A complete request now waits for its response."""
        self._in_flight += 1
        if self._in_flight >= HIGH_WATER_REQUESTS:
            self._pause()

    def request_done(self) -> None:
        """A response was written."""
        self._in_flight -= 1
        if self._in_flight <= LOW_WATER_REQUESTS and not self._writing_paused:
            self._resume()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._in_flight <= LOW_WATER_REQUESTS:
            self._resume()

    def release(self) -> None:
        """Read again whatever the marks say: the connection only drains its input now."""
        self._in_flight = 0
        self._writing_paused = False
        self._resume()

    def _pause(self) -> None:
        if not self._reading_paused and not self._transport.is_closing():
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._reading_paused and not self._transport.is_closing():
            self._reading_paused = False
            self._transport.resume_reading()
