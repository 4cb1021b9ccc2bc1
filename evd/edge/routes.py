"""The edge's routes: which handler answers a request, and the canned answers.

An authorized POST /v1/events is answered by the ingest (through the
connection's host); every other request is routed here by its path, then its
method: ``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/charts/top-tracks``
answer GET and HEAD; any other method on them, or on ``/v1/events``, is 405;
an unknown path is 404. The fixed answers are built once, at import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from evd.edge.ingest import Reply, error_reply

__all__ = [
    "CHARTS_PATH",
    "EVENTS_PATH",
    "HEALTHZ_PATH",
    "METRICS_PATH",
    "PATH_LABELS",
    "READYZ_PATH",
    "Answer",
    "Handler",
    "Routes",
    "healthz",
]

EVENTS_PATH = b"/v1/events"
HEALTHZ_PATH = b"/healthz"
READYZ_PATH = b"/readyz"
METRICS_PATH = b"/metrics"
CHARTS_PATH = b"/v1/charts/top-tracks"

#: The metrics label of each path; every other path counts as "other", so the
#: label set stays bounded whatever clients request.
PATH_LABELS = {
    path: path.decode()
    for path in (EVENTS_PATH, HEALTHZ_PATH, READYZ_PATH, METRICS_PATH, CHARTS_PATH)
}

#: A reply and its Content-Type (None: application/json).
Answer = tuple[Reply, bytes | None]
#: Answers a GET (or HEAD) of its path, given the request's URL with its query.
Handler = Callable[[bytes], Answer]

OK: Answer = (Reply(200, b'{"status":"ok"}'), None)
NOT_FOUND: Answer = (error_reply(404, "not found"), None)
USE_GET: Answer = (error_reply(405, "use GET"), None)
USE_POST: Answer = (error_reply(405, "use POST"), None)
#: An authorized POST /v1/events the connection did not ingest: the server drains.
DRAINING: Answer = (error_reply(503, "draining", 1), None)


def healthz(url: bytes) -> Answer:
    """GET /healthz: the worker's loop answers."""
    return OK


class Routes:
    """The GET endpoints by path, and what any other request is answered."""

    __slots__ = ("_get",)

    def __init__(self, get: Mapping[bytes, Handler]) -> None:
        self._get = dict(get)

    def route(self, method: bytes, path: bytes, url: bytes) -> Answer:
        """The answer to a request for ``path`` (``url``: the path with its query)."""
        if path == EVENTS_PATH:
            return USE_POST if method != b"POST" else DRAINING
        handler = self._get.get(path)
        if handler is None:
            return NOT_FOUND
        if method != b"GET" and method != b"HEAD":
            return USE_GET
        return handler(url)
