"""One worker process: recover its log, serve HTTP, drain on SIGTERM.

On the embedded log, worker ``k`` of a server is log writer ``k``: it writes
only its own journal and sub-log files (evd.core.log.embedded), so every file has
one writer. With ``log.backend: kafka`` it produces to Kafka (evd.core.log.kafka)
and runs the roles of ``server.roles`` (evd.groups).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop

from evd.config import Config
from evd.core.errors import EvdError
from evd.core.host import HostState, run_dir
from evd.core.log import Producer
from evd.core.log.embedded.layout import upgrade_layout
from evd.core.log.embedded.producer import EmbeddedLog, recover_writers
from evd.core.log.kafka.producer import KafkaLog
from evd.core.metrics.lifecycle import start_worker, stop_worker
from evd.edge.auth import RateLimiter
from evd.edge.ingest import Ingest
from evd.edge.server import Server
from evd.groups import KafkaPipeline
from evd.pipeline import Pipeline
from evd.stages import WorkerStages

log = logging.getLogger(__name__)

DEV_KEY = "evd-dev-key"
#: A worker's exit status when it cannot start (configuration, data directory,
#: port): the supervisor gives up at once instead of restarting it.
START_FAILED = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The garbage collector's thresholds in a worker (CPython's default: 700, 10, 10).
#: A worker allocates a few short-lived objects per event and makes almost no
#: reference cycles (its large long-lived state is untracked: events and open
#: sessions are gc=False structs, session logs bytes, a dict of str ids): a young
#: collection every 700 allocations visited the in-flight batches again and
#: again. With these, cyclic garbage waits for at most 50,000 allocations.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Move what start-up made (modules, config, compiled builders) out of the
    collector's sight (gc.freeze) and set GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class StageFailed(EvdError):
    """A pipeline stage died; the worker exits 1 and the supervisor restarts it."""


def _log_kwargs(cfg: Config) -> dict[str, object]:
    return {
        "fsync": cfg.log.fsync,
        "fsync_interval_ms": cfg.log.fsync_interval_ms,
        "segment_bytes": cfg.log.segment_bytes,
        "max_pending_bytes": cfg.log.max_pending_bytes,
        "checkpoint_bytes": cfg.log.checkpoint_bytes,
    }


def open_log(cfg: Config, writer: int = 0) -> EmbeddedLog:
    """Writer ``writer``'s embedded log as ``cfg`` configures it (recovered, ready for appends)."""
    lg = EmbeddedLog(
        Path(cfg.server.data_dir), cfg.log.partitions, writer=writer, **_log_kwargs(cfg)  # type: ignore[arg-type]
    )
    lg.open()
    return lg


def prepare_data_dir(cfg: Config, workers: int) -> None:
    """Before workers start: the current log layout, and complete sub-logs of writers
    that will not run (a restart with fewer workers loses nothing)."""
    data_dir = Path(cfg.server.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if cfg.log.backend == "kafka":
        return  # the log is Kafka's; data_dir holds sinks' files and the ledger
    upgrade_layout(data_dir)
    recover_writers(data_dir, cfg.log.partitions, workers, **_log_kwargs(cfg))


async def open_backend(
    cfg: Config, index: int, workers: int, on_failure: Callable[[BaseException], None]
) -> tuple[Producer, WorkerStages]:
    """The log ``log.backend`` names, open for appends, and the stages over it (not started)."""
    if cfg.log.backend == "kafka":
        kafka = KafkaLog(cfg)
        await kafka.start()
        return kafka, KafkaPipeline(cfg, kafka, index, on_failure)
    embedded = open_log(cfg, writer=index)
    return embedded, Pipeline(cfg, embedded, index, workers, on_failure)


async def serve(
    cfg: Config, index: int = 0, host: HostState | None = None, run: Path | None = None
) -> None:
    """Run worker ``index`` until SIGTERM or SIGINT, then shut down in order.

    ``run``: the server's run dir, where the workers share their metrics and
    rate-limit buckets (none: this process alone).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = host or HostState.alone()
    failures: list[BaseException] = []

    def stage_failed(exc: BaseException) -> None:
        failures.append(exc)
        stop.set()

    lg, pipeline = await open_backend(cfg, index, host.workers, stage_failed)
    limiter = RateLimiter(cfg.limits, run, keys=len(cfg.auth.keys))
    ingest = Ingest(cfg, lg, limiter)
    if "edge" not in cfg.server.roles:
        roles = ",".join(cfg.server.roles)
        ingest.refusal = f"this server does not ingest events (roles: {roles})"
    server = Server(cfg, lg, ingest, host=host)
    await pipeline.start()
    if "edge" in cfg.server.roles:
        server.charts = pipeline.charts
    start_worker(
        run, index, host.workers,
        pending_bytes=lambda: lg.pending_bytes,
        serving=lambda: not server.draining and lg.writable,
    )
    await server.start(cfg.server.host, cfg.server.port)
    tune_gc()
    host.set_up(index, True)
    if index == 0 and cfg.auth.enabled and DEV_KEY in cfg.auth.keys:
        log.warning(
            "the development API key %r is enabled: set auth.keys before exposing evd", DEV_KEY
        )
    log.info(
        "evd listening on http://%s:%d (worker %d of %d, pid %d, data_dir=%s, fsync=%s,"
        " partitions=%d, log=%s, roles=%s)",
        cfg.server.host, server.port, index, host.workers, os.getpid(), cfg.server.data_dir,
        cfg.log.fsync, cfg.log.partitions, cfg.log.backend, ",".join(cfg.server.roles),
    )
    await stop.wait()
    host.set_up(index, False)
    log.info("worker %d shutting down: draining connections", index)
    await server.drain(cfg.server.drain_grace_s, cfg.server.drain_timeout_s)
    await pipeline.stop()
    await lg.close()
    stop_worker()
    limiter.close()
    if failures:
        raise StageFailed(f"worker {index} stopped: a stage failed: {failures[0]!r}")
    log.info("worker %d stopped", index)


def _die_with_parent() -> None:
    """Have the kernel kill this process if the supervisor dies (even by SIGKILL)."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_worker(cfg: Config, index: int, log_level: int) -> None:
    """Entry point of worker process ``index`` (started by the supervisor)."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)  # the supervisor is already gone
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    # aiokafka's INFO lines (each coordinator found, each subscription) are noise here.
    logging.getLogger("aiokafka").setLevel(max(log_level, logging.WARNING))
    run = run_dir(cfg.server.data_dir)
    host = HostState.attach(run)
    try:
        uvloop.run(serve(cfg, index, host, run))
        # Drained and closed: a signal still on its way (a Ctrl-C reaches the
        # whole process group, and the supervisor forwards it too) must not
        # turn this clean exit into death by signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except StageFailed as exc:
        log.error("%s", exc)
        sys.exit(1)
    except EvdError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        sys.exit(START_FAILED)
    except OSError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        sys.exit(START_FAILED)
