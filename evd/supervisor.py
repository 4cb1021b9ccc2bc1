"""``evd serve``: the supervisor of worker processes."""

from __future__ import annotations

import logging

from evd.core.config import Config
from evd.core.errors import EvdError
from evd.worker import run_worker

log = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    """Run the configured workers until SIGTERM; returns the exit status."""
    workers = cfg.server.workers
    if workers != 1:
        # Partition ownership across worker processes (one writer per partition
        # file) comes with the scale-out work; refusing beats silently running 1.
        log.error("server.workers=%s: only 1 worker is supported so far", workers)
        return 2
    try:
        run_worker(cfg)
    except EvdError as exc:
        log.error("evd cannot start: %s", exc)
        return 2
    return 0
