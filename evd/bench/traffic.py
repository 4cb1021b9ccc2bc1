"""Synthetic listening traffic: users, sessions of plays, and the faults clients produce.

The model is a population of users with fixed home country, region and device.
A user who comes online starts a session: a run of plays of Zipf-popular tracks,
each play ending in a skip, a natural end, or interrupted by pause/resume and
seeks, with realistic gaps. Active users sit in a heap keyed by the time of their
next event; a batch for wall time ``t`` takes every user due by ``t`` and starts
new sessions only when nobody is due, so the number of concurrent listeners grows
to whatever the requested event rate needs. Past the population's capacity the
model plays faster (``stats["pace"]`` < 1), each session that ends replaced by a
new one of another user so that the listeners, the sessions and the event mix
hold at that pace, and, as a last resort, compresses gaps
(``stats["compressed"]``); if the sender is slower than the model expected,
overdue events are re-timed to at most 2 s behind (``stats["stretched"]``).

On top of the live stream it mixes in client faults at configured rates: retries
(an event already sent, sent again byte for byte), invalid events (one defect
each, named in ``stats["invalid_kinds"]``) and late events (sessions played
offline and uploaded minutes to hours later).

Everything is drawn from one ``random.Random(seed)`` plus a stateless hash of the
seed, so the same config and the same sequence of ``batch(n, t_ms)`` calls give
the same events, byte for byte.
"""

from __future__ import annotations

import gzip
import heapq
import io
import math
import random
import time
from bisect import bisect
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import msgspec
import orjson

Event = dict[str, Any]

_MASK64 = (1 << 64) - 1
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# (country, weight, regions): rough shares of a global streaming audience.
COUNTRIES: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("US", 26.0, ("CA", "NY", "TX", "FL", "WA", "IL", "GA")),
    ("BR", 9.0, ("SP", "RJ", "MG", "RS")),
    ("GB", 7.0, ("ENG", "SCT", "WLS", "NIR")),
    ("DE", 6.5, ("BE", "BY", "NW", "HH", "HE")),
    ("MX", 6.0, ("CMX", "JAL", "NLE")),
    ("IN", 5.5, ("MH", "KA", "DL", "TN")),
    ("FR", 4.5, ("IDF", "ARA", "PAC")),
    ("ID", 3.5, ("JK", "JB", "JT")),
    ("ES", 3.0, ("MD", "CT", "AN")),
    ("CA", 3.0, ("ON", "QC", "BC")),
    ("PH", 2.5, ("00", "07")),
    ("JP", 2.5, ("13", "27", "14")),
    ("AU", 2.0, ("NSW", "VIC", "QLD")),
    ("IT", 2.0, ("25", "62", "72")),
    ("SE", 1.5, ("AB", "O", "M")),
    ("NL", 1.5, ("NH", "ZH", "UT")),
    ("PL", 1.5, ("14", "12", "30")),
    ("TR", 1.5, ("34", "06", "35")),
    ("AR", 1.5, ("B", "C", "X")),
    ("ZA", 1.0, ("GP", "WC", "KZN")),
    ("NG", 1.0, ("LA", "FC")),
    ("KR", 1.0, ("11", "26")),
    ("NO", 0.8, ("03", "46")),
    ("NZ", 0.5, ("AUK", "WGN")),
    ("IE", 0.5, ("D", "C")),
)

# (os, weight): phones dominate listening time, then desktop, web, consoles/speakers.
DEVICES: tuple[tuple[str, float], ...] = (
    ("Android 14", 18.0),
    ("Android 13", 12.0),
    ("Android 12", 7.0),
    ("iOS 17.5", 17.0),
    ("iOS 16.7", 8.0),
    ("iOS 16.5", 3.0),
    ("Windows 11", 8.0),
    ("Windows 10", 7.0),
    ("macOS 14.5", 6.0),
    ("Web Chrome 126", 5.0),
    ("Web Safari 17", 2.0),
    ("PlayStation 5", 1.5),
    ("Sonos S2", 1.5),
    ("Wear OS 4", 1.0),
    ("CarPlay iOS 17", 3.0),
)

# (client_version, weight): most users update, a tail lags; the oldest one is the
# "legacy" client that omits event_type on plays (the seed event's shape).
CLIENT_VERSIONS: tuple[tuple[str, float], ...] = (
    ("8.9.52", 45.0),
    ("8.9.48", 25.0),
    ("8.9.30", 15.0),
    ("8.8.96", 10.0),
    ("8.8.32", 5.0),
)
LEGACY_VERSION = "8.8.32"

PAGES: tuple[tuple[str, float], ...] = (
    ("spotify:app:home", 35.0),
    ("spotify:app:playlist", 25.0),
    ("spotify:app:library", 15.0),
    ("spotify:app:search", 12.0),
    ("spotify:app:radio", 8.0),
    ("spotify:app:artist", 5.0),
)

INVALID_KINDS: tuple[str, ...] = (
    "bad_track_id",
    "negative_position",
    "position_over_duration",
    "missing_user_id",
    "bad_timestamp",
    "unknown_event_type",
    "bad_country",
    "empty_event_id",
    "zero_duration",
)

EVENT_TYPES: tuple[str, ...] = ("play", "pause", "resume", "seek", "skip", "end")


class TrafficConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Shape of the generated traffic; every field has a realistic default."""

    seed: int = 1
    users: int = 200_000
    """Population; users are derived from their index, only active ones use memory."""
    tracks: int = 50_000
    """Catalog size; popularity of rank k is proportional to 1/k**zipf_s."""
    zipf_s: float = 1.07
    playlists: int = 5_000
    duplicate_rate: float = 0.01
    """Fraction of emitted events that are retries of a recently sent event."""
    invalid_rate: float = 0.005
    """Fraction of emitted events with exactly one schema defect."""
    late_rate: float = 0.01
    """Fraction of emitted events from offline sessions uploaded late."""
    late_delay_median_s: float = 1200.0
    late_delay_max_s: float = 6 * 3600.0
    plays_per_session: float = 12.0
    """Mean plays in a session (geometric)."""
    skip_rate: float = 0.30
    pause_rate: float = 0.08
    seek_rate: float = 0.04
    abandon_after_pause: float = 0.25
    """Chance a paused play is never resumed (the session just stops)."""
    track_median_s: float = 200.0
    hot_tracks: int = 12
    """Size of the 'album drop' (new tracks that get ``hot_share`` of plays during a spike)."""


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _base62(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        chars.append(_B62[rem])
    return "".join(chars)


def _cumulative(weights: list[float]) -> list[float]:
    total = 0.0
    out = []
    for w in weights:
        total += w
        out.append(total)
    return out


_ts_cache_sec = -1
_ts_cache_text = ""


def format_ts(ms: int) -> str:
    """Format epoch milliseconds as RFC 3339 UTC with milliseconds (``...T10:15:30.123Z``)."""
    global _ts_cache_sec, _ts_cache_text
    sec, rem = divmod(ms, 1000)
    if sec != _ts_cache_sec:
        # Consecutive events share the second; formatting it once per second
        # keeps timestamps off the generator's profile.
        _ts_cache_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _ts_cache_sec = sec
    return f"{_ts_cache_text}.{rem:03d}Z"


def parse_ts(text: str) -> int | None:
    """Parse an RFC 3339 timestamp to epoch ms; ``None`` when it is not one."""
    import datetime as _dt

    try:
        parsed = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        return None
    return int(parsed.timestamp() * 1000)


# Share of the population that may be mid-session at once: above it new
# listeners are hard to find by random draw and gaps get compressed.
_MAX_ACTIVE_SHARE = 0.6

# A listener's event may trail the batch time by at most this much (ms); more
# means the model's pace is ahead of the real send rate.
_MAX_LAG_MS = 2000

# Length-bias cap for warm-start stretches: most plays are shorter than this.
_WARM_STRETCH_MS = 240_000


class _User:
    """A listener in a session: what they play now and what they do next."""

    __slots__ = (
        "action",
        "action_pos",
        "context",
        "device",
        "due",
        "duration",
        "geo",
        "idx",
        "initiator",
        "legacy",
        "playlist",
        "plays_left",
        "pos",
        "seek_to",
        "track",
        "uid",
    )

    def __init__(self, idx: int, uid: str, device: dict[str, str], geo: dict[str, str],
                 legacy: bool, playlist: str) -> None:
        self.idx = idx
        self.uid = uid
        self.device = device
        self.geo = geo
        self.legacy = legacy
        self.playlist = playlist
        self.plays_left = 0
        self.track = 0
        self.duration = 0
        self.pos = 0
        self.context: dict[str, str] = {}
        self.initiator = "user_click"
        self.action = "play"
        self.action_pos = 0
        self.seek_to = 0
        self.due = 0


class TrafficModel:
    """Deterministic generator of listening events; see the module docstring.

    ``batch(n, t_ms)`` returns ``n`` event dicts that a client would send at epoch
    ``t_ms``; call it with non-decreasing ``t_ms``. Process ``k`` of ``n`` passes
    ``user_offset=k, user_stride=n, stream=k`` to own a disjoint set of users. ``rate_hint`` (events/s) sizes
    the listeners already mid-session at ``start_ms`` so the event-type mix is
    steady from the first batch instead of starting with a burst of session starts.
    """

    def __init__(self, config: TrafficConfig, start_ms: int, rate_hint: float = 1000.0,
                 user_offset: int = 0, user_stride: int = 1, stream: int = 0) -> None:
        self.config = config
        # ``stream`` separates the draws of processes sharing a seed; user identities
        # (ids, countries, devices) depend on the seed only.
        self.rng = random.Random(config.seed * 1_000_003 + stream)
        self._seed_mix = _splitmix64(config.seed)
        # A process driving part of the load owns users offset, offset+stride, ...
        # so no user's events are split between processes (per-user order holds).
        self._user_offset = user_offset
        self._user_stride = max(1, user_stride)
        self._own_users = max(1, (config.users - user_offset + self._user_stride - 1)
                              // self._user_stride)
        self._track_cum = _cumulative([1.0 / (k ** config.zipf_s)
                                       for k in range(1, config.tracks + 1)])
        self._playlist_cum = _cumulative([1.0 / (k ** 0.9)
                                          for k in range(1, config.playlists + 1)])
        self._country_cum = _cumulative([w for _, w, _ in COUNTRIES])
        self._device_cum = _cumulative([w for _, w in DEVICES])
        self._version_cum = _cumulative([w for _, w in CLIENT_VERSIONS])
        self._page_cum = _cumulative([w for _, w in PAGES])
        self._track_cache: dict[int, tuple[str, int]] = {}
        self._playlist_cache: dict[int, str] = {}
        self._heap: list[tuple[int, int, int]] = []
        self._active: dict[int, _User] = {}
        self._seq = 0
        self._recent: deque[Event] = deque(maxlen=2048)
        self._late_queue: deque[Event] = deque()
        self.hot_share = 0.0
        self._pace = 1.0
        self.now_ms = start_ms
        self.stats: dict[str, Any] = {
            "events": 0, "duplicates": 0, "invalid": 0, "late": 0, "compressed": 0,
            "stretched": 0,
            "sessions": 0, "by_type": {t: 0 for t in EVENT_TYPES},
            "invalid_kinds": {k: 0 for k in INVALID_KINDS},
        }
        self._warm_start(start_ms, rate_hint)

    # ------------------------------------------------------------------ catalog
    def _track(self, idx: int) -> tuple[str, int]:
        cached = self._track_cache.get(idx)
        if cached is None:
            h1 = _splitmix64(self._seed_mix ^ (idx * 2 + 1))
            h2 = _splitmix64(h1)
            tid = "spotify:track:" + _base62((h1 << 64) | h2, 22)
            # Log-normal durations (sigma 0.35) clamped to 30 s .. 15 min.
            z = math.sqrt(-2.0 * math.log(((h2 >> 11) + 1) / 2.0**53)) * math.cos(
                2 * math.pi * ((h1 >> 11) / 2.0**53))
            dur = int(self.config.track_median_s * 1000 * math.exp(0.35 * z))
            cached = (tid, min(900_000, max(30_000, dur)))
            self._track_cache[idx] = cached
        return cached

    def _pick_track(self) -> int:
        rng = self.rng
        if self.hot_share and rng.random() < self.hot_share:
            # The album drop: brand-new tracks beyond the catalog.
            return self.config.tracks + rng.randrange(self.config.hot_tracks)
        return bisect(self._track_cum, rng.random() * self._track_cum[-1])

    def _playlist_uri(self, idx: int) -> str:
        uri = self._playlist_cache.get(idx)
        if uri is None:
            h1 = _splitmix64(self._seed_mix ^ (idx * 2 + 0x5A5A))
            uri = "spotify:playlist:" + _base62((h1 << 64) | _splitmix64(h1), 22)
            self._playlist_cache[idx] = uri
        return uri

    def _make_user(self, idx: int) -> _User:
        h = _splitmix64(self._seed_mix ^ (idx << 1))
        uid = f"hashed_user_{h:016x}"
        h2 = _splitmix64(h)
        country_i = bisect(self._country_cum,
                           (h2 & 0xFFFFFF) / 0x1000000 * self._country_cum[-1])
        country, _, regions = COUNTRIES[min(country_i, len(COUNTRIES) - 1)]
        region = regions[(h2 >> 24) % len(regions)]
        dev_i = bisect(self._device_cum, ((h2 >> 32) & 0xFFFF) / 0x10000 * self._device_cum[-1])
        ver_i = bisect(self._version_cum, ((h2 >> 48) & 0xFFFF) / 0x10000
                       * self._version_cum[-1])
        version = CLIENT_VERSIONS[min(ver_i, len(CLIENT_VERSIONS) - 1)][0]
        h3 = _splitmix64(h2)
        pl_i = bisect(self._playlist_cum, (h3 & 0xFFFFFF) / 0x1000000 * self._playlist_cum[-1])
        return _User(
            idx, uid,
            {"os": DEVICES[min(dev_i, len(DEVICES) - 1)][0], "client_version": version},
            {"country": country, "region": region},
            version == LEGACY_VERSION,
            self._playlist_uri(min(pl_i, self.config.playlists - 1)),
        )

    def _random_user_index(self) -> int:
        return self._user_offset + self.rng.randrange(self._own_users) * self._user_stride

    # ------------------------------------------------------------ session model
    def _new_context(self, u: _User) -> dict[str, str]:
        rng = self.rng
        page = PAGES[min(bisect(self._page_cum, rng.random() * self._page_cum[-1]),
                         len(PAGES) - 1)][0]
        if page == "spotify:app:playlist" or rng.random() < 0.3:
            return {"page_uri": page, "playlist_uri": u.playlist}
        return {"page_uri": page}

    def _start_play(self, u: _User, t: int, initiator: str) -> None:
        u.track = self._pick_track()
        u.duration = self._track(u.track)[1]
        u.pos = 0
        u.initiator = initiator
        u.action = "play"
        u.action_pos = 0
        u.due = t

    def _decide(self, u: _User, t: int) -> None:
        """Pick what ends the stretch of playing that starts at ``u.pos`` at time ``t``."""
        cfg = self.config
        rng = self.rng
        remaining = u.duration - u.pos
        r = rng.random()
        if remaining <= 1000:
            u.action, u.action_pos = "end", u.duration
        elif r < cfg.skip_rate:
            # Most skips come in the first seconds of a track.
            u.action = "skip"
            u.action_pos = u.pos + min(remaining - 1, int(rng.expovariate(1 / 25_000.0)) + 500)
        elif r < cfg.skip_rate + cfg.pause_rate:
            u.action = "pause"
            u.action_pos = u.pos + int(remaining * rng.uniform(0.05, 0.95))
        elif r < cfg.skip_rate + cfg.pause_rate + cfg.seek_rate:
            u.action = "seek"
            u.action_pos = u.pos + int(remaining * rng.uniform(0.05, 0.9))
            u.seek_to = rng.randrange(u.duration)
        else:
            u.action, u.action_pos = "end", u.duration
        u.due = t + int((u.action_pos - u.pos) * self._pace)

    def _start_session(self, u: _User, t: int) -> None:
        rng = self.rng
        mean = self.config.plays_per_session
        # Geometric number of plays with the configured mean (at least one).
        u.plays_left = 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean)) \
            if mean > 1 else 1
        u.context = self._new_context(u)
        self._start_play(u, t, "user_click")
        self.stats["sessions"] += 1

    def _event(self, u: _User, etype: str, t: int, position: int) -> Event:
        h = f"{self.rng.getrandbits(128):032x}"
        ev: Event = {
            "event_id": f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}",
            "event_type": etype,
            "timestamp": format_ts(t),
            "user_id": u.uid,
            "track_id": self._track(u.track)[0],
            "context": u.context,
            "playback": {"position_ms": position, "duration_ms": u.duration,
                         "initiator": u.initiator},
            "device": u.device,
            "geo": u.geo,
        }
        if u.legacy and etype == "play":
            del ev["event_type"]
        return ev

    def _step(self, u: _User, t: int) -> tuple[Event, bool]:
        """Emit ``u``'s pending action at ``t`` and schedule the next; False = session over."""
        rng = self.rng
        action = u.action
        if action == "play":
            ev = self._event(u, "play", t, u.pos)
            self._decide(u, t)
            return ev, True
        if action == "seek":
            ev = self._event(u, "seek", t, u.seek_to)
            u.pos = u.seek_to
            self._decide(u, t)
            return ev, True
        if action == "pause":
            ev = self._event(u, "pause", t, u.action_pos)
            u.pos = u.action_pos
            if rng.random() < self.config.abandon_after_pause:
                return ev, False
            u.action = "resume"
            # Pauses: median 20 s, long tail, capped well under the 30 min session gap.
            pause = min(900_000, int(20_000 * math.exp(1.2 * rng.gauss(0.0, 1.0))))
            u.due = t + int(pause * self._pace)
            return ev, True
        if action == "resume":
            ev = self._event(u, "resume", t, u.pos)
            self._decide(u, t)
            return ev, True
        # skip or end: the play is over.
        ev = self._event(u, action, t, u.action_pos)
        u.plays_left -= 1
        if u.plays_left <= 0:
            return ev, False
        if action == "end":
            self._start_play(u, t + int(rng.randrange(50, 800) * self._pace), "autoplay")
        else:
            self._start_play(u, t + int(rng.randrange(200, 3000) * self._pace), "forward_button")
        if rng.random() < 0.1:
            u.context = self._new_context(u)
        return ev, True

    def _push(self, u: _User) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (u.due, self._seq, u.idx))

    def _warm_start(self, start_ms: int, rate_hint: float) -> None:
        """Put listeners mid-session so the first batches already have a steady mix."""
        live_share = 1.0 - self.config.duplicate_rate - self.config.invalid_rate \
            - self.config.late_rate
        needed = rate_hint * live_share * self._mean_gap_s()
        limit = self._own_users * _MAX_ACTIVE_SHARE
        if needed > limit:
            # Not enough users for this rate at real pace: play everything faster
            # (positions stay real, gaps shrink) rather than run out of listeners.
            self._pace = limit / needed
            needed = limit
        self.stats["pace"] = self._pace
        # Take every k-th user so the warm set has no collisions and is spread
        # over the population.
        target = int(needed)
        step = max(1, self._own_users // max(1, target))
        for i in range(target):
            idx = self._user_offset + ((i * step) % self._own_users) * self._user_stride
            if idx in self._active:
                continue
            u = self._make_user(idx)
            self._start_session(u, start_ms)
            self.stats["sessions"] -= 1
            # A listener caught at a random instant is more likely inside a long
            # stretch (a track played to the end) than a short one (an early
            # skip): pick stretches in proportion to their length, then a
            # uniform point inside, which is the steady state of the model.
            for _ in range(20):
                self._decide(u, start_ms)
                ahead = u.due - start_ms
                if self.rng.random() * _WARM_STRETCH_MS < ahead:
                    break
            u.due = start_ms + int(ahead * self.rng.random())
            self._active[idx] = u
            self._push(u)

    def _mean_gap_s(self) -> float:
        """Estimate seconds between two events of one listener by simulating one."""
        saved = self.rng
        self.rng = random.Random(self.config.seed ^ 0x6A09E667)
        try:
            u = self._make_user(0)
            t = 0
            self._start_session(u, t)
            events = 0
            for _ in range(4000):
                _, alive = self._step(u, u.due)
                events += 1
                if not alive:
                    self._start_session(u, u.due)
            return max(1.0, u.due / 1000.0 / events)
        finally:
            self.rng = saved
            self.stats["sessions"] = 0
            self._track_cache.clear()

    # ------------------------------------------------------------------ faults
    def _invalid(self, t: int) -> Event:
        u = self._make_user(self._random_user_index())
        u.context = self._new_context(u)
        self._start_play(u, t, "user_click")
        ev = self._event(u, "play", t, 0)
        # Copy nested dicts: they are shared with the user's valid events.
        ev["playback"] = dict(ev["playback"])
        ev["geo"] = dict(ev["geo"])
        kind = INVALID_KINDS[self.rng.randrange(len(INVALID_KINDS))]
        if kind == "bad_track_id":
            ev["track_id"] = ev["track_id"][:-1]
        elif kind == "negative_position":
            ev["playback"]["position_ms"] = -self.rng.randrange(1, 5000)
        elif kind == "position_over_duration":
            ev["playback"]["position_ms"] = ev["playback"]["duration_ms"] + 1000
        elif kind == "missing_user_id":
            del ev["user_id"]
        elif kind == "bad_timestamp":
            ev["timestamp"] = "2023-13-45T25:61:00Z"
        elif kind == "unknown_event_type":
            ev["event_type"] = "rewind"
        elif kind == "bad_country":
            ev["geo"]["country"] = "USA"
        elif kind == "empty_event_id":
            ev["event_id"] = ""
        else:
            ev["playback"]["duration_ms"] = 0
            ev["playback"]["position_ms"] = 0
        self.stats["invalid_kinds"][kind] += 1
        return ev

    def _fill_late(self, t: int) -> None:
        """Simulate a session played offline, ending well before ``t``, and queue it."""
        cfg = self.config
        rng = self.rng
        delay = min(cfg.late_delay_max_s,
                    cfg.late_delay_median_s * math.exp(rng.gauss(0.0, 1.0))) * 1000
        delay = max(120_000.0, delay)
        u = self._make_user(self._random_user_index())
        begin = t - int(delay)
        self._start_session(u, begin)
        self.stats["sessions"] -= 1
        cutoff = t - 60_000
        for _ in range(rng.randrange(3, 16)):
            if u.due >= cutoff:
                break
            ev, alive = self._step(u, u.due)
            self._late_queue.append(ev)
            if not alive:
                break

    # ------------------------------------------------------------------- batch
    def _live(self, t: int) -> Event:
        heap = self._heap
        while True:
            if heap and heap[0][0] <= t:
                due, _, idx = heapq.heappop(heap)
                u = self._active[idx]
                if due < t - _MAX_LAG_MS:
                    # More listeners than the sender's real rate needs: stretch the
                    # gap rather than let timestamps fall ever further behind.
                    due = t - self.rng.randrange(_MAX_LAG_MS)
                    self.stats["stretched"] += 1
                break
            for _ in range(4):
                idx = self._random_user_index()
                if idx not in self._active:
                    u = self._make_user(idx)
                    self._start_session(u, t)
                    self._active[idx] = u
                    due = t
                    break
            else:
                if not heap:
                    raise RuntimeError("traffic model has no users to draw from; raise users")
                # Everyone we tried is already listening: compress time rather
                # than emit events from the future.
                due, _, idx = heapq.heappop(heap)
                u = self._active[idx]
                u.due = due = t
                self.stats["compressed"] += 1
            break
        ev, alive = self._step(u, due)
        if alive:
            self._push(u)
        else:
            del self._active[idx]
            if self._pace < 1.0:
                self._replace(due)
        return ev

    def _replace(self, t: int) -> None:
        """Start a session of another user in place of one that ended at ``t``.

        At a faster pace someone is always due, so the rule that starts sessions
        only when nobody is due would never fire: the listeners would drain and
        the mix collapse into the ends of the sessions playing at the start.
        """
        for _ in range(16):  # with at most 60 % of the users active, all 16 miss rarely
            idx = self._random_user_index()
            if idx not in self._active:
                u = self._make_user(idx)
                self._start_session(u, t + int(self.rng.randrange(1000, 30_000) * self._pace))
                self._active[idx] = u
                self._push(u)
                return

    def batch(self, n: int, t_ms: int) -> list[Event]:
        """Return the next ``n`` events, as a client sending at epoch ms ``t_ms`` would."""
        self.now_ms = max(self.now_ms, t_ms)
        t = self.now_ms
        cfg = self.config
        rng = self.rng
        stats = self.stats
        by_type = stats["by_type"]
        recent = self._recent
        p_dup = cfg.duplicate_rate
        p_inv = p_dup + cfg.invalid_rate
        p_late = p_inv + cfg.late_rate
        out: list[Event] = []
        for _ in range(n):
            r = rng.random()
            if r < p_dup and recent:
                ev = recent[rng.randrange(len(recent))]
                stats["duplicates"] += 1
            elif r < p_inv:
                ev = self._invalid(t)
                stats["invalid"] += 1
            elif r < p_late:
                if not self._late_queue:
                    self._fill_late(t)
                if self._late_queue:
                    ev = self._late_queue.popleft()
                    stats["late"] += 1
                    by_type[ev.get("event_type", "play")] += 1
                    recent.append(ev)
                else:
                    ev = self._live(t)
                    by_type[ev.get("event_type", "play")] += 1
                    recent.append(ev)
            else:
                ev = self._live(t)
                by_type[ev.get("event_type", "play")] += 1
                recent.append(ev)
            out.append(ev)
        stats["events"] += n
        return out

    def active_listeners(self) -> int:
        """Number of users currently in a session."""
        return len(self._active)


# --------------------------------------------------------------------- files
def encode_envelope(events: list[Event], sent_at_ms: int | None) -> bytes:
    """Encode the ``POST /v1/events`` body for ``events``."""
    if sent_at_ms is None:
        return orjson.dumps({"events": events})
    return orjson.dumps({"sent_at": format_ts(sent_at_ms), "events": events})


def envelope_from_lines(lines: list[bytes], sent_at_ms: int | None) -> bytes:
    """Build a request body from already-encoded event lines without re-encoding them."""
    head = b'{"events":[' if sent_at_ms is None else (
        b'{"sent_at":"' + format_ts(sent_at_ms).encode() + b'","events":[')
    return head + b",".join(lines) + b"]}"


@contextmanager
def _open_write(path: Path) -> Iterator[IO[bytes]]:
    with open(path, "wb") as raw:
        if path.suffix != ".gz":
            yield raw
            return
        # mtime=0 and no file name in the header: the same stream gives the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                           compresslevel=6) as packed:
            yield cast(IO[bytes], packed)


def _open_read(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def write_stream(path: Path, config: TrafficConfig, events: int, rate: float,
                 start_ms: int, batch: int = 100) -> dict[str, Any]:
    """Write ``events`` generated events as NDJSON (gzip if ``path`` ends in .gz).

    Batch ``j`` is generated for time ``start_ms + j * batch / rate``, exactly as a
    single-process live run at ``rate`` would. Returns the model's stats.
    """
    model = TrafficModel(config, start_ms, rate_hint=rate)
    written = 0
    j = 0
    with _open_write(path) as out:
        buf = io.BytesIO()
        while written < events:
            n = min(batch, events - written)
            t = start_ms + int(j * batch * 1000 / rate)
            for ev in model.batch(n, t):
                buf.write(orjson.dumps(ev))
                buf.write(b"\n")
            written += n
            j += 1
            if buf.tell() > 1 << 20:
                out.write(buf.getvalue())
                buf.seek(0)
                buf.truncate()
        out.write(buf.getvalue())
    return model.stats


def iter_stream_lines(path: Path) -> Iterator[bytes]:
    """Yield each event of a stream file as its encoded JSON bytes (no newline)."""
    with _open_read(path) as src:
        for line in src:
            line = line.rstrip(b"\r\n")
            if line:
                yield line


def first_timestamp_ms(path: Path) -> int | None:
    """Return the event time of the first parseable event in a stream file."""
    for i, line in enumerate(iter_stream_lines(path)):
        if i > 1000:
            return None
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("timestamp"), str):
            ms = parse_ts(ev["timestamp"])
            if ms is not None:
                return ms
    return None


def rebase_line(line: bytes, offset_ms: int) -> bytes:
    """Shift a recorded event's timestamp by ``offset_ms``; other bytes are kept as is.

    An event whose timestamp does not parse (a deliberately invalid one) is
    returned unchanged, so replay keeps sending the same defects.
    """
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if not isinstance(ev, dict):
        return line
    ts = ev.get("timestamp")
    if not isinstance(ts, str):
        return line
    ms = parse_ts(ts)
    if ms is None:
        return line
    ev["timestamp"] = format_ts(ms + offset_ms)
    return orjson.dumps(ev)
