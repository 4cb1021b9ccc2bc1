"""The stages a worker runs beside its HTTP edge, wired to its log.

Worker ``k`` of ``n`` owns the partitions ``p`` with ``p % n == k``: it runs
their processors (evd.state.runner), and for every configured sink a delivery
loop over those partitions of the sink's streams (evd.sinks.delivery), plus
the audit stage (evd.sinks.audit). Every worker follows the ``charts`` stream
for the top-tracks API (evd.state.charts_view) and sweeps retention of its own
sub-logs (evd.core.log.embedded.retention; worker 0 also those of writers that no longer
run). Only offsets and wake-ups travel between workers, never events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from evd.core.config import BatchConfig, Config, RetryConfig
from evd.core.log import PROCESSOR, Consumer, Producer, SubLog, TopicPartition
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.embedded.retention import Retention
from evd.core.log.streams import Stream
from evd.sinks import build_sink
from evd.sinks.audit import AUDIT_STAGE, AUDIT_STREAMS, AuditStage
from evd.sinks.base import SinkContext
from evd.sinks.delivery import DeliveryLoop
from evd.sinks.ledger import Ledger
from evd.sinks.metrics import SinkMetrics, set_sinks
from evd.state import metrics
from evd.state.charts_view import ChartsView, make_view
from evd.state.runner import PartitionRunner
from evd.state.snapshots import DirectoryStore

__all__ = ["Pipeline", "delivery_loops", "owned_partitions", "publish_gauges", "spawn"]

log = logging.getLogger(__name__)

#: How often the processors' gauges (lag, open sessions, buffer) are published.
GAUGE_INTERVAL_S = 1.0
#: The audit stage's batches: it writes nothing, so only the ledger's commits cost.
AUDIT_BATCH = BatchConfig(max_events=100_000, max_bytes=8 * 1024 * 1024, max_age_s=1.0)


def owned_partitions(partitions: int, index: int, workers: int) -> list[int]:
    """The raw partitions worker ``index`` of ``workers`` processes."""
    return [p for p in range(partitions) if p % workers == index]


def spawn(
    tasks: set[asyncio.Task[None]],
    coro: Coroutine[Any, Any, None],
    what: str,
    on_failure: Callable[[BaseException], None],
) -> asyncio.Task[None]:
    """Run ``coro`` as a task kept in ``tasks``; if it dies, log it and call ``on_failure``."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)

    def done(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        if not t.cancelled() and (exc := t.exception()) is not None:
            log.error("%s failed: %r", what, exc, exc_info=exc)
            on_failure(exc)

    task.add_done_callback(done)
    return task


async def publish_gauges(runners: Callable[[], Iterable[PartitionRunner]]) -> None:
    """Every GAUGE_INTERVAL_S, the processors' lag, open sessions and buffered events."""
    while True:
        lag_bytes, lag_seconds, sessions, buffered = 0, 0.0, 0, 0
        for runner in runners():
            lag = runner.consumer.lag()
            lag_bytes += lag.bytes
            lag_seconds = max(lag_seconds, lag.seconds)
            if runner.processor is not None:
                sessions += runner.processor.open_sessions
                buffered += runner.processor.buffered
        metrics.PROCESSOR_LAG_BYTES.set(lag_bytes)
        metrics.PROCESSOR_LAG_SECONDS.set(lag_seconds)
        metrics.OPEN_SESSIONS.set(sessions)
        metrics.BUFFERED_EVENTS.set(buffered)
        await asyncio.sleep(GAUGE_INTERVAL_S)


def delivery_loops(
    cfg: Config,
    ctx: SinkContext,
    open_consumer: Callable[[str], Consumer],
    producer: Producer,
    ledger: Ledger,
    partitions: list[int],
    raw_ends: Callable[[], Awaitable[dict[SubLog, int]]] | None = None,
) -> list[DeliveryLoop]:
    """A delivery loop per configured sink, and the audit stage, over ``partitions``
    (not started); each reads through its own consumer, named after it."""
    # The audit stage's counts and lag are reported beside the sinks' (sink="audit").
    set_sinks([*(sink.name for sink in cfg.sinks), AUDIT_STAGE])
    loops = [
        DeliveryLoop(
            name=sink_cfg.name, sink=build_sink(sink_cfg, ctx),
            consumer=open_consumer(sink_cfg.name), producer=producer, ledger=ledger,
            streams=sink_cfg.streams, partitions=partitions, batch=sink_cfg.batch,
            retry=sink_cfg.retry, event_types=sink_cfg.event_types,
            sink_metrics=SinkMetrics(i), raw_ends=raw_ends,
        )
        for i, sink_cfg in enumerate(cfg.sinks)
    ]
    loops.append(DeliveryLoop(
        name=AUDIT_STAGE, sink=AuditStage(), consumer=open_consumer(AUDIT_STAGE), producer=None,
        ledger=ledger, streams=AUDIT_STREAMS, partitions=partitions,
        batch=AUDIT_BATCH, retry=RetryConfig(), kind="audit", raw_ends=raw_ends,
        sink_metrics=SinkMetrics(len(cfg.sinks)),
    ))
    return loops


class Pipeline:
    """Processors and delivery loops of the owned partitions, the charts view,
    retention: started after the log is open, stopped (processors snapshot,
    sinks write what they gathered) before it closes.

    ``on_failure`` is called with the exception if a stage dies; the worker
    then stops and exits non-zero, and the supervisor restarts it from the
    snapshots (crash-only: no half-working stage is kept).
    """

    def __init__(
        self,
        cfg: Config,
        lg: EmbeddedLog,
        index: int,
        workers: int,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.cfg = cfg
        self.lg = lg
        self.index = index
        self.workers = workers
        self.on_failure = on_failure
        self.data_dir = Path(cfg.server.data_dir)
        self.charts: ChartsView = make_view(cfg)
        self.runners: list[PartitionRunner] = []
        self._consumers: list[EmbeddedConsumer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner_tasks: list[asyncio.Task[None]] = []
        self.deliveries: list[DeliveryLoop] = []
        self._delivery_tasks: list[asyncio.Task[None]] = []
        self.ledger = Ledger(self.data_dir)
        self.retention = Retention(
            lg, cfg.log, self.data_dir, retired_from=workers if index == 0 else None,
            keep_s={"charts": float(cfg.charts.retention_s)},
        )

    async def start(self) -> None:
        store = DirectoryStore(self.data_dir / "state")
        owned = owned_partitions(self.cfg.log.partitions, self.index, self.workers)
        for i, p in enumerate(owned):
            consumer = EmbeddedConsumer(self.data_dir, PROCESSOR)
            self._consumers.append(consumer)
            runner = PartitionRunner(
                p, self.cfg, self.lg, consumer, store,
                sources=range(self.workers), phase=i / len(owned),
            )
            await runner.restore()
            await consumer.register()  # raw is kept for it before its first snapshot
            self.runners.append(runner)
        for runner in self.runners:
            self._runner_tasks.append(self._spawn(runner.run(), f"processor {runner.partition}"))
        await self._start_deliveries(owned)
        charts_consumer = EmbeddedConsumer(self.data_dir, None, reset="earliest")
        self._consumers.append(charts_consumer)
        self._spawn(self.charts.follow(charts_consumer), "charts view")
        self._spawn(publish_gauges(lambda: self.runners), "processor gauges")
        self.retention.start()

    async def _raw_ends(self, partitions: list[int]) -> dict[SubLog, int]:
        """End offsets of every raw sub-log of ``partitions`` (for the delivery loops)."""
        consumer = EmbeddedConsumer(self.data_dir, None)
        try:
            consumer.assign(TopicPartition(Stream.RAW, p) for p in partitions)
            return await consumer.end_offsets()
        finally:
            await consumer.close()

    async def _start_deliveries(self, owned: list[int]) -> None:
        """A delivery loop per sink, and the audit stage, over the owned partitions."""
        cfg = self.cfg

        def open_consumer(name: str | None) -> EmbeddedConsumer:
            consumer = EmbeddedConsumer(self.data_dir, name)
            if name is not None:
                self._consumers.append(consumer)
            return consumer

        ctx = SinkContext(
            data_dir=self.data_dir, worker=self.index, workers=self.workers,
            partitions=cfg.log.partitions, chart_window_ms=cfg.charts.window_s * 1000,
            kafka=cfg.kafka, open_consumer=lambda name: EmbeddedConsumer(self.data_dir, name),
        )

        def raw_ends() -> Awaitable[dict[SubLog, int]]:
            return self._raw_ends(owned)

        self.deliveries = delivery_loops(
            cfg, ctx, open_consumer, self.lg, self.ledger, owned, raw_ends
        )
        for delivery in self.deliveries:
            await delivery.start()
        for delivery in self.deliveries:
            self._delivery_tasks.append(self._spawn(delivery.run(), f"sink {delivery.name}"))

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        return spawn(self._tasks, coro, what, self.on_failure)

    async def stop(self) -> None:
        """Processors finish their pass and snapshot; the rest is cancelled."""
        for runner in self.runners:
            runner.stop()
        results = await asyncio.gather(*self._runner_tasks, return_exceptions=True)
        for runner, result in zip(self.runners, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("processor %d did not snapshot at shutdown: %r", runner.partition, result)
        for delivery in self.deliveries:
            delivery.stop()
        results = await asyncio.gather(*self._delivery_tasks, return_exceptions=True)
        for delivery, result in zip(self.deliveries, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("sink %s did not finish at shutdown: %r", delivery.name, result)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.retention.stop()
        for consumer in self._consumers:
            await consumer.close()
        await self.ledger.close()
