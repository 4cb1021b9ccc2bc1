"""API keys and per-key rate limits."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from evd.core.config import AuthConfig, LimitsConfig

__all__ = ["KeyRing", "RateLimiter", "SharedBuckets"]


class KeyRing:
    """Checks ``Authorization: Bearer <key>`` against configured keys in constant time.

    A configured key is either the key itself or ``sha256:<hex digest of the key>``.
    """

    def __init__(self, cfg: AuthConfig) -> None:
        self.enabled = cfg.enabled
        self._plain = [k.encode() for k in cfg.keys if not k.startswith("sha256:")]
        self._digests = [bytes.fromhex(k[7:]) for k in cfg.keys if k.startswith("sha256:")]

    def check(self, authorization: bytes | None) -> bytes | None:
        """The key that authorizes the request, or None."""
        if not self.enabled:
            return b""
        if authorization is None or authorization[:7].lower() != b"bearer ":
            return None
        key = authorization[7:].strip()
        ok = False
        # No early exit: every entry is compared, so timing does not say which matched.
        for plain in self._plain:
            ok |= hmac.compare_digest(plain, key)
        if self._digests:
            digest = hashlib.sha256(key).digest()
            for expected in self._digests:
                ok |= hmac.compare_digest(expected, digest)
        return key if ok else None


class RateLimiter:
    """Token bucket per API key, in events per second, for the whole server.

    A bucket is kept as one number, its theoretical arrival time (GCRA): the
    moment it would be full again. ``tokens(now) = burst - rate * (tat - now)``,
    capped at ``burst``; taking ``n`` tokens moves ``tat`` ``n / rate`` seconds
    on. With ``shared`` (the server's run dir) the buckets live in
    ``<shared>/ratelimit.bin``, one slot per key, read and written by every
    worker, so a key's limit holds for the server however its requests spread
    over workers and connections; otherwise in this process. With the limit
    off (rate 0) nothing is created and nothing is checked.
    """

    def __init__(self, cfg: LimitsConfig, shared: Path | None = None, keys: int = 1) -> None:
        self.rate = cfg.rate_limit_events_per_s
        self.burst = float(cfg.rate_limit_burst or max(self.rate, 1.0))
        #: The buckets: in this process, or shared by the server's workers. Only
        #: authorized keys get here, so both are bounded by the configured keys.
        self._buckets: _LocalBuckets | SharedBuckets = _LocalBuckets()
        if shared is not None and self.rate > 0:
            self._buckets = SharedBuckets(shared / SharedBuckets.FILE, keys + 1)

    def empty(self, key: bytes) -> float:
        """Seconds until ``key`` has a token again; 0.0 when it has one now.

        Checked before a body is read, so a client over its limit is refused for
        the price of parsing headers, not of decoding its batch.
        """
        if self.rate <= 0:
            return 0.0
        tat = self._buckets.peek(key)
        # Tokens now, from the bucket's arrival time (a full bucket's is in the past).
        tokens = self.burst - (tat - time.monotonic()) * self.rate
        return 0.0 if tokens >= 1 else max(1.0, math.ceil((1 - tokens) / self.rate))

    def take(self, key: bytes, events: int) -> float:
        """Take ``events`` tokens; 0.0 if allowed, else seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        return self._buckets.update(key, self._take, events)

    def _take(self, tat: float, events: int) -> tuple[float, float]:
        """(the bucket's new arrival time, the wait): the rule, given the bucket's state."""
        now = time.monotonic()
        rate, burst = self.rate, self.burst
        tat = max(tat, now)
        tokens = burst - (tat - now) * rate
        if tokens >= events or (tokens >= burst and events > burst):
            # A batch bigger than the whole bucket is let through when the bucket is
            # full (going negative), or it could never be accepted at all.
            return tat + events / rate, 0.0
        # A batch bigger than the bucket only needs a full bucket (see above).
        return tat, max(1.0, math.ceil((min(events, burst) - tokens) / rate))

    def close(self) -> None:
        self._buckets.close()


Rule = Callable[[float, int], tuple[float, float]]


class _LocalBuckets:
    """The buckets of one process: key -> arrival time."""

    def __init__(self) -> None:
        self._tat: dict[bytes, float] = {}

    def peek(self, key: bytes) -> float:
        return self._tat.get(key, 0.0)

    def update(self, key: bytes, rule: Rule, events: int) -> float:
        tat, wait = rule(self._tat.get(key, 0.0), events)
        self._tat[key] = tat
        return wait

    def close(self) -> None:
        pass


class SharedBuckets:
    """Buckets in a file every worker of a server maps: ``<u64 magic><u64 slots>``,
    then per key ``<i64 fingerprint><f64 arrival time>`` (fingerprint 0: free).

    Buckets are read and written under ``flock`` of the file, so workers take
    tokens one at a time (it is held for a few microseconds, and costs half
    what a byte-range ``lockf`` of the bucket does; flock belongs to the open
    file, so two instances in one process exclude each other too). The arrival
    time is one aligned 8-byte value, so ``peek`` reads it without the lock
    (it cannot tear). Arrival times are ``time.monotonic()``, CLOCK_MONOTONIC,
    one clock for every process of the host.
    """

    FILE = "ratelimit.bin"
    MAGIC = 0x657664726C696D31  # "evdrlim1"
    HEAD = 16
    SLOT = 16

    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # The first worker here sizes the file; the lock makes the others wait.
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self._fd).st_size == 0:
                    os.ftruncate(self._fd, self.HEAD + self.SLOT * slots)
                    os.pwrite(self._fd, struct.pack("<qq", self.MAGIC, slots), 0)
                magic, self.slots = struct.unpack("<qq", os.pread(self._fd, self.HEAD, 0))
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if magic != self.MAGIC:
                raise ValueError(f"{path} is not an evd rate limit file")
            self._map = mmap.mmap(self._fd, self.HEAD + self.SLOT * self.slots)
        except BaseException:
            os.close(self._fd)
            raise
        self._ints = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        #: key -> its slot's index in the 8-byte views (fingerprint; arrival time next).
        self._index: dict[bytes, int] = {}
        #: Keys that found the table full: limited by this process alone.
        self._overflow = _LocalBuckets()

    def _find(self, key: bytes) -> int:
        """The view index of ``key``'s slot, claimed if new; -1 if the table is full."""
        index = self._index.get(key)
        if index is not None:
            return index
        mark = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)
        mark = mark or 1
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            ints = self._ints
            found = -1
            for i in range(2, 2 + 2 * self.slots, 2):
                if ints[i] == mark:
                    found = i
                    break
                if ints[i] == 0:
                    # A full bucket, written before the fingerprint that publishes it.
                    self._floats[i + 1] = 0.0
                    ints[i] = mark
                    found = i
                    break
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if found >= 0:
            self._index[key] = found
        return found

    def peek(self, key: bytes) -> float:
        index = self._find(key)
        if index < 0:
            return self._overflow.peek(key)
        return self._floats[index + 1]

    def update(self, key: bytes, rule: Rule, events: int) -> float:
        index = self._find(key)
        if index < 0:
            return self._overflow.update(key, rule, events)
        fd = self._fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            tat, wait = rule(self._floats[index + 1], events)
            self._floats[index + 1] = tat
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return wait

    def close(self) -> None:
        if self._fd < 0:
            return
        self._ints.release()
        self._floats.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1
