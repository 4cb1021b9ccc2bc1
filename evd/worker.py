"""One worker process: recover the log, serve HTTP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path

import uvloop

from evd.core.config import Config
from evd.core.embedded import EmbeddedLog
from evd.core.errors import ConfigError
from evd.edge.ingest import Ingest
from evd.edge.server import Server

log = logging.getLogger(__name__)

DEV_KEY = "evd-dev-key"


def open_log(cfg: Config) -> EmbeddedLog:
    """The raw log configured by ``cfg`` (recovered, ready for appends)."""
    if cfg.log.backend != "embedded":
        raise ConfigError("log.backend: only 'embedded' is implemented so far")
    lg = EmbeddedLog(
        Path(cfg.server.data_dir),
        cfg.log.partitions,
        fsync=cfg.log.fsync,
        fsync_interval_ms=cfg.log.fsync_interval_ms,
        segment_bytes=cfg.log.segment_bytes,
        max_pending_bytes=cfg.log.max_pending_bytes,
        checkpoint_bytes=cfg.log.checkpoint_bytes,
    )
    lg.open()
    return lg


async def serve(cfg: Config, sock: socket.socket | None = None) -> None:
    """Run one worker until SIGTERM or SIGINT, then shut down in order."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lg = open_log(cfg)
    server = Server(cfg, lg, Ingest(cfg, lg))
    await server.start(cfg.server.host, cfg.server.port, sock)
    if cfg.auth.enabled and DEV_KEY in cfg.auth.keys:
        log.warning(
            "the development API key %r is enabled: set auth.keys before exposing evd", DEV_KEY
        )
    log.info(
        "evd listening on http://%s:%d (data_dir=%s, fsync=%s, partitions=%d)",
        cfg.server.host, server.port, cfg.server.data_dir, cfg.log.fsync, cfg.log.partitions,
    )
    await stop.wait()
    log.info("shutting down: draining connections")
    await server.drain(cfg.server.drain_grace_s, cfg.server.drain_timeout_s)
    await lg.close()
    log.info("stopped")


def run_worker(cfg: Config, sock: socket.socket | None = None) -> None:
    """Entry point of a worker process."""
    uvloop.run(serve(cfg, sock))
