"""The http (webhook) sink against a real HTTP server on 127.0.0.1: the body and
headers it sends, what it retries (5xx, 429 with Retry-After in seconds or as a
date, connection refused, no answer) and what it gives up on at once (other 4xx,
redirects)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web
from evdtest import sink_context

from evd.core.errors import ConfigError
from evd.core.schema import (
    ChartRow,
    ChartsBatch,
    DeadLetter,
    Event,
    EventsBatch,
    Geo,
    Play,
    Playback,
    Session,
    SessionsBatch,
)
from evd.sinks import rows
from evd.sinks.base import Batch, PermanentSinkError, SinkError
from evd.sinks.http import EXCERPT_CHARS, HttpSink, HttpSinkConfig, parse_retry_after

pytestmark = pytest.mark.workers_independent

WINDOW_MS = 60_000
T = datetime(2025, 12, 1, 10, 59, 59, 500000, tzinfo=UTC)
T_MS = 1_764_586_799_500
TRACK = "spotify:track:" + "b" * 22
AUTH = "Bearer s3cret"


def events_batch(n: int = 3) -> Batch:
    evs = [Event(f"e{i}", T, "u1", TRACK, Playback(i, 10), "skip" if i % 2 else "play",
                 geo=Geo("SE") if i % 3 else None) for i in range(n)]
    return Batch("events", [EventsBatch(T_MS + 1000, evs, 1000, [1])], n, 100 * n)


# -- the target ---------------------------------------------------------------------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int]
    content_types: list[str]


@dataclass
class Target:
    """A webhook target: answers with ``replies`` in turn (200 once they run out)
    and records every request."""

    url: str
    replies: list[Reply] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.path_qs, dict(request.headers), await request.read(),
                              tuple(peer or ("", 0)), request.headers.getall("Content-Type", [])))
        if self.replies:
            return await self.replies.pop(0)(request)
        return web.json_response({"ok": True})


def reply(status: int, body: str = "", **headers: str) -> Reply:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    return answer


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    app = web.Application()
    t = Target("")
    app.router.add_post("/{tail:.*}", t.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    t.url = f"http://{host}:{port}/hook?team=a"
    try:
        yield t
    finally:
        await runner.cleanup()


def make_sink(tmp_path: Path, url: str, timeout_s: float = 5.0, auth: bool = True) -> HttpSink:
    cfg = HttpSinkConfig(name="hook", url=url, headers={"Authorization": AUTH} if auth else {},
                         timeout_s=timeout_s)
    return HttpSink(cfg, sink_context(tmp_path, 0, 1, 4, WINDOW_MS))


@pytest.fixture
async def sink(tmp_path: Path, target: Target) -> AsyncIterator[HttpSink]:
    s = make_sink(tmp_path, target.url)
    await s.start()
    yield s
    await s.close()


# -- what is sent -------------------------------------------------------------------------


async def test_body_is_the_rows_of_the_batch_with_auth(sink: HttpSink, target: Target) -> None:
    batch = events_batch()
    await sink.write(batch)
    (req,) = target.seen
    assert req.path == "/hook?team=a"
    assert req.headers["Authorization"] == AUTH
    assert req.content_types == ["application/json"]
    lines = rows.json_lines(batch, WINDOW_MS).splitlines()
    # The rows are spliced in as they are, not encoded again.
    assert req.body == (b'{"sink":"hook","stream":"events","count":3,"items":['
                        + b",".join(lines) + b"]}")
    doc = json.loads(req.body)
    assert doc["items"] == [json.loads(line) for line in lines]
    assert [i["late"] for i in doc["items"]] == [False, True, False]
    assert doc["items"][0]["event_type"] == "play"


@pytest.mark.parametrize("stream", ["sessions", "charts", "dead_letter"])
async def test_every_stream_is_sent_as_its_rows(
    sink: HttpSink, target: Target, stream: str
) -> None:
    values: list[object] = {
        "sessions": [SessionsBatch([Session("s", "u1", T_MS, T_MS + 5, 2, 1, 0, 5, None, "ios",
                                            [Play(TRACK, T_MS, 5, "skip")], 2, True)])],
        "charts": [ChartsBatch(2, T_MS, [ChartRow(T_MS, None, TRACK, 3, 1),
                                         ChartRow(T_MS, "SE", TRACK, 1)])],
        "dead_letter": [DeadLetter(T_MS, 0, "bad", b'{"event_id":"x"}')],
    }[stream]
    batch = Batch(stream, list(values), sum(rows.count_items(stream, v) for v in values), 10)
    await sink.write(batch)
    doc = json.loads(target.seen[0].body)
    assert (doc["sink"], doc["stream"], doc["count"]) == ("hook", stream, batch.count)
    assert doc["items"] == [json.loads(line)
                            for line in rows.json_lines(batch, WINDOW_MS).splitlines()]
    # Revisions pass on as they are.
    assert [(i.get("revision"), i.get("retracted")) for i in doc["items"]] == {
        "sessions": [(2, True)], "charts": [(1, None), (0, None)], "dead_letter": [(None, None)],
    }[stream]


async def test_batches_without_items_send_nothing(sink: HttpSink, target: Target) -> None:
    await sink.write(Batch("charts", [ChartsBatch(0, T_MS, [])], 0, 20))
    await sink.write(Batch("events", [EventsBatch(T_MS, [], duplicates={"play": 2})], 0, 20))
    await sink.write(Batch("dead_letter", [], 0, 0))
    assert target.seen == []


async def test_connections_are_kept_alive(sink: HttpSink, target: Target) -> None:
    # A long 200 answer is drained up to a bound; short ones keep the connection.
    for _ in range(3):
        await sink.write(events_batch(1))
    assert len({r.peer for r in target.seen}) == 1
    target.replies.append(reply(200, "x" * 200_000))
    await sink.write(events_batch(1))
    await sink.write(events_batch(1))
    assert len(target.seen) == 5


async def test_a_configured_content_type_replaces_the_default(
    tmp_path: Path, target: Target
) -> None:
    cfg = HttpSinkConfig(name="hook", url=target.url,
                         headers={"content-type": "application/json; charset=utf-8"})
    sink = HttpSink(cfg, sink_context(tmp_path, 0, 1, 4, WINDOW_MS))
    await sink.start()
    try:
        await sink.write(events_batch(1))
    finally:
        await sink.close()
    assert target.seen[0].content_types == ["application/json; charset=utf-8"]
    assert "Authorization" not in target.seen[0].headers


# -- answers ------------------------------------------------------------------------------


async def test_503_is_retried_then_delivered(sink: HttpSink, target: Target) -> None:
    target.replies.append(reply(503, "down for maintenance"))
    batch = events_batch()
    with pytest.raises(SinkError, match="HTTP 503") as err:
        await sink.write(batch)
    assert err.value.retriable and err.value.retry_after is None
    await sink.write(batch)  # the loop's retry
    assert len(target.seen) == 2 and target.seen[0].body == target.seen[1].body


async def test_429_retry_after_in_seconds(sink: HttpSink, target: Target) -> None:
    target.replies.append(reply(429, **{"Retry-After": "7"}))
    with pytest.raises(SinkError) as err:
        await sink.write(events_batch())
    assert err.value.retriable and err.value.retry_after == 7.0


async def test_retry_after_as_a_date(sink: HttpSink, target: Target) -> None:
    when = datetime.fromtimestamp(time.time() + 30, UTC)
    target.replies.append(reply(429, **{"Retry-After": format_datetime(when, usegmt=True)}))
    target.replies.append(reply(502, **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    with pytest.raises(SinkError) as err:
        await sink.write(events_batch())
    assert err.value.retry_after is not None and 27 <= err.value.retry_after <= 30
    with pytest.raises(SinkError) as err:
        await sink.write(events_batch())
    assert err.value.retriable and err.value.retry_after == 0.0  # a date already past


async def test_400_is_permanent_with_the_answer(sink: HttpSink, target: Target) -> None:
    target.replies.append(reply(400, '{"error": "items[1].event_id: duplicate"}'))
    with pytest.raises(PermanentSinkError) as err:
        await sink.write(events_batch())
    msg = str(err.value)
    assert not err.value.retriable
    assert "HTTP 400 Bad Request" in msg and "items[1].event_id: duplicate" in msg
    assert "s3cret" not in msg and "team=a" not in msg
    target.replies.append(reply(422, "y" * 5000))
    with pytest.raises(PermanentSinkError) as err:
        await sink.write(events_batch())
    assert str(err.value).endswith(": " + "y" * EXCERPT_CHARS)


async def test_redirects_are_not_followed(sink: HttpSink, target: Target) -> None:
    target.replies.append(reply(302, Location="/elsewhere"))
    with pytest.raises(PermanentSinkError, match="HTTP 302"):
        await sink.write(events_batch())
    assert [r.path for r in target.seen] == ["/hook?team=a"]


# -- no answer ----------------------------------------------------------------------------


async def test_connection_refused_is_retriable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = make_sink(tmp_path, f"http://user:pw@127.0.0.1:{port}/hook?token=abc", auth=False)
    assert sink.describe() == {"type": "http", "url": f"http://127.0.0.1:{port}/hook"}
    await sink.start()
    try:
        with pytest.raises(SinkError) as err:
            await sink.write(events_batch())
    finally:
        await sink.close()
    assert err.value.retriable and not isinstance(err.value, PermanentSinkError)
    assert "token" not in str(err.value) and "pw" not in str(err.value)


#: When the slow target answers: far later than the sink's 0.2 s timeout_s.
REPLY_AFTER_S = 3.0


async def test_no_answer_in_time_is_retriable(tmp_path: Path, target: Target) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(REPLY_AFTER_S)
        return web.Response()

    target.replies.append(slow)
    sink = make_sink(tmp_path, target.url, timeout_s=0.2)
    await sink.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SinkError, match="no answer within 0.2 s") as err:
            await sink.write(events_batch())
    finally:
        await sink.close()
    assert err.value.retriable
    # Given up on before the answer came (a 200: no error at all had it waited for it).
    assert time.monotonic() - t0 < REPLY_AFTER_S


def test_credentials_in_the_url_and_an_authorization_header_conflict(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Authorization"):
        make_sink(tmp_path, "http://user:pw@127.0.0.1:9/hook")


async def test_lifecycle_is_checked(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, "http://127.0.0.1:9/hook")
    with pytest.raises(RuntimeError, match="before start"):
        await sink.write(events_batch())
    await sink.start()
    with pytest.raises(RuntimeError, match="already started"):
        await sink.start()
    await sink.close()
    await sink.close()
    with pytest.raises(RuntimeError, match="after close"):
        await sink.write(events_batch())


# -- Retry-After --------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "want"), [
    (None, None),
    ("120", 120.0),
    (" 5 ", 5.0),
    ("0", 0.0),
    ("-5", None),
    ("1.5", None),
    ("soon", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("Sun, 06 Nov 1994 08:50:37 GMT", 60.0),
    ("Sunday, 06-Nov-94 08:49:47 GMT", 10.0),  # the obsolete RFC 850 form
    ("Sun Nov  6 08:50:07 1994", 30.0),  # asctime, no zone: GMT
])
def test_parse_retry_after(value: str | None, want: float | None) -> None:
    now = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    assert parse_retry_after(value, now) == want
