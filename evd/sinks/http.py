"""Webhooks (``type: http``): each batch is one JSON POST, the Pub/Sub push analogue.

The body is ``{"sink": name, "stream": stream, "count": n, "items": [...]}``,
the items being the rows of evd.sinks.rows (the same as the lake's and stdout's
lines), with ``Content-Type: application/json`` and the configured ``headers``
(e.g. ``Authorization``). A batch with no items sends nothing.

Answers: 2xx is delivered. 429, 5xx, a connection error or no answer within
``timeout_s`` raise a retriable SinkError carrying the target's ``Retry-After``
(seconds or an HTTP date) when it sent one. Any other status (4xx, and 3xx:
redirects are not followed, since a POST redirected to a GET would lose the
body and still look delivered) is a PermanentSinkError naming the status and
the start of the answer: the batch is dead-lettered.

Delivery is at least once: a batch whose answer was lost is sent again, so the
target deduplicates by the items' ids (event_id, session_id, the chart key).
A batch is sent whole: the delivery loop already bounds it (``batch.max_bytes``,
8 MiB of log records by default), so there is no further split.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC
from typing import TYPE_CHECKING, Any

import msgspec

from evd.core.config import SinkConfig
from evd.core.errors import ConfigError
from evd.sinks import rows
from evd.sinks.base import Batch, PermanentSinkError, Sink, SinkContext, SinkError

if TYPE_CHECKING:
    import aiohttp

__all__ = ["HttpSink", "HttpSinkConfig", "parse_retry_after"]

# aiohttp (and its yarl and multidict) are imported by the sink when one is
# configured, not with this module: the registry imports every sink module to
# read its config section, and a worker without webhooks should not carry the
# client library's objects (every cyclic GC pass walks them).

#: Bytes of an answer read at most: the excerpt an error quotes, and what is
#: drained so the connection can be reused (a longer answer closes it instead).
DRAIN_BYTES = 64 * 1024
#: Characters of an error answer quoted in the error (and so in dead letters).
EXCERPT_CHARS = 200

_encode = msgspec.json.Encoder().encode


class HttpSinkConfig(SinkConfig, tag="http", kw_only=True):
    """Webhooks: POST JSON batches to a URL."""

    url: str
    #: Extra request headers, e.g. {Authorization: "Bearer ..."}.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: One request's time limit (connect + send + answer).
    timeout_s: float = 10.0

    def validate(self, where: str) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL")
        has_user = "@" in self.url.split("://", 1)[1].split("/", 1)[0]
        if has_user and any(h.lower() == "authorization" for h in self.headers):
            raise ConfigError(
                f"{where}.headers: the url has credentials and headers an Authorization:"
                " use one of them"
            )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP-date;
    a date in the past is 0), or None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is taken as such
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HttpSink(Sink):
    """POSTs every batch to ``cfg.url``; see the module docstring."""

    def __init__(self, cfg: HttpSinkConfig, ctx: SinkContext) -> None:
        self.cfg = cfg
        self.window_ms = ctx.chart_window_ms
        from yarl import URL

        self.url = URL(cfg.url)
        if self.url.user is not None and any(h.lower() == "authorization" for h in cfg.headers):
            # aiohttp sends URL credentials as basic auth and refuses both at once.
            raise ConfigError(
                f"http sink {cfg.name!r}: the url has credentials and headers an"
                " Authorization: use one of them"
            )
        #: What errors and describe() may show of the URL: never its credentials or query.
        self.target = str(self.url.with_user(None).with_query(None).with_fragment(None))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        """Open the client session (connections are pooled and kept alive)."""
        if self._closed:
            raise RuntimeError(f"http sink {self.cfg.name!r} is closed; it cannot start again")
        if self._session is not None:
            raise RuntimeError(f"http sink {self.cfg.name!r} was already started")
        import aiohttp
        from multidict import CIMultiDict

        headers = CIMultiDict({"Content-Type": "application/json"})
        headers.update(self.cfg.headers)  # case-insensitive: a configured content-type replaces ours
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        )

    async def write(self, batch: Batch) -> None:
        """POST the batch's items as one JSON body; nothing when it has none."""
        session = self._session
        if session is None or self._closed:
            raise RuntimeError(
                f"http sink {self.cfg.name!r}: write() before start() or after close()"
            )
        if not batch.values:
            return
        # Encoding a batch of thousands of rows takes milliseconds: off the loop.
        body = await asyncio.to_thread(self._body, batch)
        if body is None:
            return
        where = f"http sink {self.cfg.name!r}: POST {self.target}"
        try:
            async with session.post(self.url, data=body, allow_redirects=False) as resp:
                answer = await _drain(resp)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
                reason = resp.reason or ""
        except TimeoutError:
            raise SinkError(f"{where}: no answer within {self.cfg.timeout_s:g} s") from None
        except _client_error() as exc:
            raise SinkError(f"{where}: {type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return
        message = f"{where}: HTTP {status} {reason}".rstrip()
        excerpt = answer[: EXCERPT_CHARS * 4].decode(errors="replace")[:EXCERPT_CHARS].strip()
        if excerpt:
            message = f"{message}: {excerpt}"
        if status == 429 or status >= 500:
            raise SinkError(message, retry_after=parse_retry_after(retry_after))
        raise PermanentSinkError(message)

    async def close(self) -> None:
        """Close the client session (idempotent)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def describe(self) -> dict[str, Any]:
        return {"type": "http", "url": self.target}

    def _body(self, batch: Batch) -> bytes | None:
        lines = rows.json_lines(batch, self.window_ms)
        if not lines:
            return None
        # Rows are single lines (JSON escapes newlines in strings), so the NDJSON
        # becomes the items array by turning each separator into a comma.
        count = lines.count(b"\n")
        return b'{"sink":%s,"stream":%s,"count":%d,"items":[%s]}' % (
            _encode(self.cfg.name), _encode(batch.stream), count,
            lines[:-1].replace(b"\n", b","),
        )


def _client_error() -> type[Exception]:
    """aiohttp's base error (imported once a sink started, so already loaded)."""
    import aiohttp

    return aiohttp.ClientError


async def _drain(resp: aiohttp.ClientResponse) -> bytes:
    """Up to DRAIN_BYTES of the answer; reading it to its end lets the
    connection be reused, a longer one is closed on release."""
    data = bytearray()
    while len(data) < DRAIN_BYTES:
        chunk = await resp.content.readany()
        if not chunk:
            break
        data += chunk
    return bytes(data)
