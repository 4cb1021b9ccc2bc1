"""The peer evd is measured against: a bare FastAPI + pydantic collector on uvicorn.

It does what the naive collector evd replaces does: validate ``POST /v1/events``
against the event contract (pydantic models of the same fields and bounds) and
append each event as one NDJSON line to a file, then answer 200 with evd's
answer shape. No log, no fsync, no processing, no sinks. One uvicorn worker
(uvloop and httptools, as uvicorn picks them when installed).

    python -m bench.collector --port 8090 --out /tmp/events.ndjson

Only for benchmarks (``bench/versus.py``): it is in the ``bench`` extra, never a
runtime dependency of evd.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import IO, Annotated, Literal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field, model_validator

EventType = Literal["play", "pause", "resume", "seek", "skip", "end"]
ShortText = Annotated[str, Field(max_length=256)]


class Context(BaseModel):
    page_uri: ShortText | None = None
    playlist_uri: ShortText | None = None


class Playback(BaseModel):
    position_ms: int = Field(ge=0)
    duration_ms: int = Field(gt=0)
    initiator: ShortText | None = None

    @model_validator(mode="after")
    def position_within_duration(self) -> Playback:
        if self.position_ms > self.duration_ms:
            raise ValueError("position_ms must be <= duration_ms")
        return self


class Device(BaseModel):
    os: ShortText | None = None
    client_version: ShortText | None = None


class Geo(BaseModel):
    country: str = Field(pattern=r"^[A-Z]{2}$")
    region: ShortText | None = None


class Event(BaseModel):
    event_id: str = Field(min_length=1, max_length=64)
    event_type: EventType = "play"
    timestamp: datetime
    user_id: str = Field(min_length=1, max_length=128)
    track_id: str = Field(pattern=r"^spotify:track:[0-9A-Za-z]{22}$")
    context: Context | None = None
    playback: Playback
    device: Device | None = None
    geo: Geo | None = None


class Envelope(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=1000)
    sent_at: datetime | None = None


def make_app(out: IO[bytes]) -> FastAPI:
    """The collector appending to ``out``."""
    app = FastAPI()

    @app.post("/v1/events")
    async def ingest(body: Envelope) -> dict[str, object]:
        out.write(b"".join(e.model_dump_json().encode() + b"\n" for e in body.events))
        out.flush()
        return {"accepted": len(body.events), "duplicates": 0, "rejected": []}

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--out", required=True, help="the NDJSON file events are appended to")
    args = parser.parse_args(argv)
    with open(args.out, "ab") as out:
        uvicorn.run(make_app(out), host="127.0.0.1", port=args.port, log_level="warning",
                    access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
