"""Error logging that a flood of failures cannot turn into a flood of log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["ThrottledLog"]

#: Least seconds between two logged tracebacks: bounds what a client that can
#: trigger an internal error on every request makes evd write to its log.
INTERVAL_S = 10.0


class ThrottledLog:
    """Logs an exception with its traceback at most once per ``interval_s``.

    The ones in between are counted, and the count is logged with the next.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._next = -float("inf")
        self.suppressed = 0

    def error(self, message: str, exc: BaseException) -> None:
        """Log ``message`` and ``exc``'s traceback, unless one was logged recently."""
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self._interval_s
        suppressed, self.suppressed = self.suppressed, 0
        if suppressed:
            self._logger.error(
                "%s (%d more errors since the last traceback were not logged)",
                message, suppressed, exc_info=exc,
            )
        else:
            self._logger.error("%s", message, exc_info=exc)
