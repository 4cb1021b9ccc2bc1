"""The log's vocabulary: its streams, and the consumers other stages refer to by name."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["PROCESSOR", "Stream"]


class Stream(StrEnum):
    """A named stream of the log; its value is the directory (embedded) or topic suffix (Kafka)."""

    #: What the edge accepted: micro-batches of validated, enriched events.
    RAW = "raw"
    #: Events the edge or a sink could not take, with the reason.
    DEAD_LETTER = "dead_letter"
    #: Every accepted event once (deduplicated), flagged ``late`` when past the lateness.
    EVENTS = "events"
    #: Listening sessions, emitted when they close.
    SESSIONS = "sessions"
    #: Per-window play counts, emitted when the watermark passes a window.
    CHARTS = "charts"
    #: Events too late for sessions and charts.
    LATE = "late"


#: The processors' consumer of ``raw``: its committed offsets are what the
#: latest snapshots cover (the lake's hour completeness reads them).
PROCESSOR = "processor"
