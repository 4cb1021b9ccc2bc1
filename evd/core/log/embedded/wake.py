"""Wake-ups between log writers and readers in other processes.

After publishing durable ends, a writer's flush writes one byte to ``<log>/_wake``
(one ``pwrite``, whatever the number of readers). A reader that found nothing new
waits on an inotify watch of that file instead of polling; where the platform has
no inotify it re-checks every FALLBACK_POLL_S.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

from evd.core.throttle import ThrottledLog

__all__ = ["DurableWatch", "Waker", "wake_path"]

log = logging.getLogger(__name__)

WAKE_FILE = "_wake"
#: How often DurableWatch.wait re-checks where the platform has no inotify (not Linux).
FALLBACK_POLL_S = 0.05


def wake_path(log_root: Path) -> Path:
    return log_root / WAKE_FILE


class Waker:
    """A writer's side of wake-ups: one byte written to ``_wake`` after a publication."""

    def __init__(self, log_root: Path) -> None:
        self._fd = os.open(wake_path(log_root), os.O_WRONLY | os.O_CREAT, 0o644)
        self._errors = ThrottledLog(log)

    def poke(self) -> None:
        """Tell waiting readers that a durable end moved (never raises)."""
        try:
            os.pwrite(self._fd, b"\0", 0)
        except OSError as exc:
            # The data is durable and published; readers only learn of it at
            # their next wake-up or timeout.
            self._errors.error(f"log wake-up failed: {exc}", exc)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_IN_MODIFY = 0x00000002
_IN_IGNORED = 0x00008000
_IN_EVENT = struct.Struct("iIII")


class _Inotify:
    """The two inotify calls evd needs, through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


_inotify: _Inotify | None = None


def _inotify_calls() -> _Inotify | None:
    global _inotify
    if _inotify is None and sys.platform.startswith("linux"):
        _inotify = _Inotify()
    return _inotify


class DurableWatch:
    """Waits, without polling, until any writer of ``data_dir`` publishes a durable end.

    Create it before the first check of the sub-logs, check them, and when
    nothing is new ``await wait(timeout)``, then check again. A publication
    after a check is never missed: it is either pending when ``wait`` starts
    (it returns at once) or it ends the wait. ``wait`` may return True with
    nothing new for the caller (every writer's flush, of any partition, wakes
    every watch). One inotify descriptor and one watch; ``add_reader`` friendly.
    Where inotify is missing (not Linux), ``wait`` re-checks every
    FALLBACK_POLL_S instead.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = wake_path(Path(data_dir) / "log")
        self._fd = -1
        self._closed = False
        calls = _inotify_calls()
        if calls is None:
            return
        fd = calls.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        try:
            self._watch(calls)
        except OSError:
            self.close()
            raise

    def _watch(self, calls: _Inotify) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
        if calls.add_watch(self._fd, os.fsencode(self.path), _IN_MODIFY) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", str(self.path))

    def fileno(self) -> int:
        """The descriptor that turns readable on a wake-up (-1 without inotify)."""
        return self._fd

    def drain(self) -> bool:
        """Consume pending wake-ups; True if there was one."""
        got = False
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return got
            got = True
            pos = 0
            while pos + _IN_EVENT.size <= len(data):
                _, mask, _, name_len = _IN_EVENT.unpack_from(data, pos)
                if mask & _IN_IGNORED:
                    # The wake file was removed: watch the one writers create next.
                    calls = _inotify_calls()
                    assert calls is not None
                    self._watch(calls)
                pos += _IN_EVENT.size + name_len

    async def wait(self, timeout: float) -> bool:
        """Until a durable end may have moved (True) or ``timeout`` seconds passed (False)."""
        if self._closed:
            raise RuntimeError("DurableWatch is closed")
        if self._fd < 0:
            await asyncio.sleep(min(timeout, FALLBACK_POLL_S))
            return True
        if self.drain():
            return True
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not woken.done():
                woken.set_result(None)

        loop.add_reader(self._fd, readable)
        try:
            async with asyncio.timeout(timeout):
                await woken
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._fd)
        self.drain()
        return True

    def close(self) -> None:
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
