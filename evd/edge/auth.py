"""API keys and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from evd.core.config import AuthConfig, LimitsConfig


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
    """Token bucket per API key, in events per second."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.rate = cfg.rate_limit_events_per_s
        self.burst = float(cfg.rate_limit_burst or max(self.rate, 1.0))
        #: key -> (tokens, last refill). Only authorized keys get here, so the
        #: dict is bounded by the configured key count.
        self._buckets: dict[bytes, tuple[float, float]] = {}

    def empty(self, key: bytes) -> float:
        """Seconds until ``key`` has a token again; 0.0 when it has one now.

        Checked before a body is read, so a client over its limit is refused for
        the price of parsing headers, not of decoding its batch.
        """
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens, last = bucket
        tokens += (time.monotonic() - last) * self.rate
        return 0.0 if tokens >= 1 else max(1.0, math.ceil((1 - tokens) / self.rate))

    def take(self, key: bytes, events: int) -> float:
        """Take ``events`` tokens; 0.0 if allowed, else seconds to wait before retrying."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= events or (tokens >= self.burst and events > self.burst):
            # A batch bigger than the whole bucket is let through when the bucket is
            # full (going negative), or it could never be accepted at all.
            self._buckets[key] = (tokens - events, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        # A batch bigger than the bucket only needs a full bucket (see above).
        return max(1.0, math.ceil((min(events, self.burst) - tokens) / self.rate))
