"""The one wiring of the stages: the processors and the delivery loops of a set of partitions.

Both log backends start and stop their stages here, so every setting means the
same in both:

- the embedded worker (evd.pipeline) calls it once with the partitions it owns
  (``p % workers == index``) and stops it at shutdown;
- the Kafka roles (evd.groups) call it from their group memberships' callbacks:
  ``start_processors`` / ``stop_processors`` as raw partitions are assigned and
  revoked, ``start_deliveries`` / ``stop_deliveries`` as output partitions are.

A processor (evd.state.runner.PartitionRunner) restores its partition's latest
snapshot from ``snapshot.dir`` (default ``{data_dir}/state``) and replays the raw
stream from the offsets it covers; stopping it writes a snapshot first. A
delivery loop (evd.sinks.delivery) runs per configured sink, plus the audit
stage, each through its own named consumer (own committed offsets); the loops
started together share their decodes (evd.sinks.decoded).

Every task is owned by this object; one that dies calls ``on_failure`` (the
worker then exits non-zero and is restarted from the snapshots: crash-only).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from pathlib import Path
from typing import Any

from evd.config import Config
from evd.core.config import BatchConfig, RetryConfig
from evd.core.log import PROCESSOR, Consumer, Producer, Stream, SubLog, TopicPartition
from evd.edge.charts import ChartsView, make_view
from evd.sinks.audit.ledger import Ledger
from evd.sinks.audit.stage import AUDIT_STAGE, AUDIT_STREAMS, AuditStage
from evd.sinks.base import Sink, SinkContext
from evd.sinks.decoded import DecodedRecords
from evd.sinks.delivery import DeliveryLoop
from evd.sinks.metrics import SinkMetrics, set_sinks
from evd.sinks.registry import build_sink
from evd.state import metrics
from evd.state.runner import PartitionRunner
from evd.state.snapshots import DirectoryStore

__all__ = ["OpenConsumer", "Stages", "WorkerStages", "publish_gauges", "snapshot_dir"]

log = logging.getLogger(__name__)

#: A consumer of the server's log by name (None: anonymous, cannot commit), not yet assigned.
OpenConsumer = Callable[[str | None], Consumer]

#: How often the processors' gauges (lag, open sessions, buffer) are published.
GAUGE_INTERVAL_S = 1.0
#: The audit stage's batches: it writes nothing, so only the ledger's commits cost.
AUDIT_BATCH = BatchConfig(max_events=100_000, max_bytes=8 * 1024 * 1024, max_age_s=1.0)
#: How long the delivery loops get to write what they gathered when they are stopped.
DELIVERY_STOP_S = 30.0


def snapshot_dir(cfg: Config) -> Path:
    """Where the processors' snapshots live (``snapshot.dir``, else ``{data_dir}/state``)."""
    return Path(cfg.snapshot.dir or Path(cfg.server.data_dir) / "state")



async def publish_gauges(runners: Callable[[], Iterable[PartitionRunner]]) -> None:
    """Every GAUGE_INTERVAL_S, the processors' lag, open and kept sessions, buffered events."""
    while True:
        lag_bytes, lag_seconds, sessions, kept, buffered = 0, 0.0, 0, 0, 0
        for runner in runners():
            lag = runner.consumer.lag()
            lag_bytes += lag.bytes
            lag_seconds = max(lag_seconds, lag.seconds)
            if runner.processor is not None:
                sessions += runner.processor.open_sessions
                kept += runner.processor.kept_sessions
                buffered += runner.processor.buffered
        metrics.PROCESSOR_LAG_BYTES.set(lag_bytes)
        metrics.PROCESSOR_LAG_SECONDS.set(lag_seconds)
        metrics.OPEN_SESSIONS.set(sessions)
        metrics.KEPT_SESSIONS.set(kept)
        metrics.BUFFERED_EVENTS.set(buffered)
        await asyncio.sleep(GAUGE_INTERVAL_S)


async def _wait_stopped(tasks: list[asyncio.Task[None]], timeout: float | None) -> int:
    """Wait for ``tasks`` up to ``timeout`` (None: for ever), cancel the rest; how many were late."""
    if not tasks:
        return 0
    _, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(late)


class Stages:
    """The processors and delivery loops of one process, per partition set (module docstring).

    ``sources``: the raw sub-logs' writers a processor waits for before its
    watermark moves (every worker of an embedded server; source 0 on Kafka).
    """

    def __init__(
        self,
        cfg: Config,
        producer: Producer,
        open_consumer: OpenConsumer,
        sources: Collection[int],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.cfg = cfg
        self.producer = producer
        self.open_consumer = open_consumer
        self.sources = tuple(sources)
        self.on_failure = on_failure
        self.data_dir = Path(cfg.server.data_dir)
        self.store = DirectoryStore(snapshot_dir(cfg))
        #: Partition -> its running processor and that processor's task.
        self.runners: dict[int, tuple[PartitionRunner, asyncio.Task[None]]] = {}
        self.deliveries: list[tuple[DeliveryLoop, asyncio.Task[None]]] = []
        self._ledger: Ledger | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        """A task owned by these stages, cancelled by ``close``; if it dies, it is
        logged and ``on_failure`` is called."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.error("%s failed: %r", what, exc, exc_info=exc)
                self.on_failure(exc)

        task.add_done_callback(done)
        return task

    def running(self) -> list[PartitionRunner]:
        """The processors running now (for the gauges)."""
        return [runner for runner, _ in self.runners.values()]

    # -- processors -------------------------------------------------------------------------

    async def start_processors(self, partitions: Iterable[int]) -> list[int]:
        """Restore and start a processor for each of ``partitions`` not running yet; those started."""
        if self._closed:
            return []
        new = sorted(p for p in set(partitions) if p not in self.runners)
        for i, p in enumerate(new):
            consumer = self.open_consumer(PROCESSOR)
            runner = PartitionRunner(
                p, self.cfg, self.producer, consumer, self.store,
                sources=self.sources, phase=i / len(new), outputs=self.open_consumer(None),
            )
            await runner.restore()
            await consumer.register()  # the log keeps raw for it before its first snapshot
            self.runners[p] = (runner, self.spawn(runner.run(), f"processor {p}"))
        return new

    async def stop_processors(
        self, partitions: Iterable[int], budget_s: float | None = None
    ) -> list[int]:
        """Stop the processors of ``partitions``, each snapshotting as it stops; those stopped.

        ``budget_s``: how long they get (None: as long as they need); one that
        does not finish is cancelled, and the partition's next owner replays
        from the snapshot before.
        """
        going = [self.runners.pop(p) for p in sorted(set(partitions)) if p in self.runners]
        for runner, _ in going:
            runner.stop()
        late = await _wait_stopped([task for _, task in going], budget_s)
        if late:
            log.warning(
                "%d of %d processors did not snapshot within %g s: their next owner"
                " replays from their previous snapshot", late, len(going), budget_s,
            )
        for runner, task in going:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("processor %d did not snapshot when stopped: %r", runner.partition, exc)
            await runner.close()
        return [runner.partition for runner, _ in going]

    # -- delivery ---------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The delivery ledger under data_dir (opened with the first delivery loops)."""
        if self._ledger is None:
            self._ledger = Ledger(self.data_dir)
        return self._ledger

    async def start_deliveries(self, partitions: Iterable[int]) -> None:
        """A delivery loop per configured sink, and the audit stage, over ``partitions``."""
        owned = sorted(set(partitions))
        if self._closed or not owned:
            return
        cfg = self.cfg
        # File names carry the lowest partition delivered: unique among the
        # processes sharing a lake, since a partition has one deliverer at a time.
        ctx = SinkContext(
            data_dir=self.data_dir, worker=owned[0], workers=cfg.log.partitions,
            partitions=cfg.log.partitions, chart_window_ms=cfg.charts.window_s * 1000,
            kafka=cfg.kafka, open_consumer=self.open_consumer,
        )

        def raw_ends() -> Awaitable[dict[SubLog, int]]:
            return self._raw_ends(owned)

        loops = self._delivery_loops(ctx, owned, raw_ends)
        for loop in loops:
            await loop.start()
        for loop in loops:
            self.deliveries.append((loop, self.spawn(loop.run(), f"sink {loop.name}")))

    def _delivery_loops(
        self,
        ctx: SinkContext,
        partitions: list[int],
        raw_ends: Callable[[], Awaitable[dict[SubLog, int]]],
    ) -> list[DeliveryLoop]:
        """The loops of every configured sink and the audit stage (not started)."""
        cfg = self.cfg
        # The audit stage's counts and lag are reported beside the sinks' (sink="audit").
        set_sinks([*(sink.name for sink in cfg.sinks), AUDIT_STAGE])
        loops = [
            DeliveryLoop(
                name=sink_cfg.name, sink=build_sink(sink_cfg, ctx),
                consumer=self.open_consumer(sink_cfg.name), producer=self.producer,
                ledger=self.ledger, streams=sink_cfg.streams, partitions=partitions,
                batch=sink_cfg.batch, retry=sink_cfg.retry, event_types=sink_cfg.event_types,
                sink_metrics=SinkMetrics(i), raw_ends=raw_ends,
            )
            for i, sink_cfg in enumerate(cfg.sinks)
        ]
        loops.append(DeliveryLoop(
            name=AUDIT_STAGE, sink=AuditStage(), consumer=self.open_consumer(AUDIT_STAGE),
            producer=None, ledger=self.ledger, streams=AUDIT_STREAMS, partitions=partitions,
            batch=AUDIT_BATCH, retry=RetryConfig(), kind="audit", raw_ends=raw_ends,
            sink_metrics=SinkMetrics(len(cfg.sinks)),
        ))
        # The sinks that decode records as the log holds them share their decodes.
        sharing = [loop for loop in loops if type(loop.sink).decode is Sink.decode
                   and type(loop.sink).decode_all is Sink.decode_all]
        decoded = DecodedRecords.of(loop.streams for loop in sharing)
        if decoded.readers:
            for loop in sharing:
                loop.decoded = decoded
        return loops

    async def _raw_ends(self, partitions: list[int]) -> dict[SubLog, int]:
        """End offsets of the raw stream's ``partitions`` (a delivery loop checks its
        ledger's raw offsets against them: the raw log may have lost records)."""
        consumer = self.open_consumer(None)
        try:
            consumer.assign(TopicPartition(Stream.RAW, p) for p in partitions)
            return await consumer.end_offsets()
        finally:
            await consumer.close()

    async def stop_deliveries(self, timeout_s: float | None = DELIVERY_STOP_S) -> None:
        """Stop every delivery loop: each writes what it gathered and commits."""
        going, self.deliveries = self.deliveries, []
        for loop, _ in going:
            loop.stop()
        await _wait_stopped([task for _, task in going], timeout_s)
        for loop, task in going:
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("sink %s did not finish when stopped: %r", loop.name, exc)
            await loop.consumer.close()

    # -- lifecycle --------------------------------------------------------------------------

    async def close(self, processors_budget_s: float | None = None) -> None:
        """Processors snapshot, sinks write what they gathered, the other tasks are
        cancelled, the ledger is closed. Nothing starts afterwards."""
        self._closed = True
        await self.stop_processors(list(self.runners), processors_budget_s)
        await self.stop_deliveries()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ledger is not None:
            await self._ledger.close()


class WorkerStages(ABC):
    """What one worker runs beside its HTTP edge over its log backend: the Stages of
    the partitions it is given, and the charts read model the edge answers from.

    A backend says how its consumers are opened and when partitions come and go
    (evd.pipeline for the embedded log, evd.groups for Kafka).
    """

    def __init__(
        self,
        cfg: Config,
        producer: Producer,
        index: int,
        sources: Collection[int],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.cfg = cfg
        self.index = index
        self.on_failure = on_failure
        #: The top-tracks API's read model, followed from the charts stream.
        self.charts: ChartsView = make_view(cfg)
        self.stages = Stages(cfg, producer, self.open_consumer, sources, on_failure)

    @abstractmethod
    def open_consumer(self, name: str | None) -> Consumer:
        """A consumer of this backend's log by name (None: anonymous), not yet assigned."""

    @abstractmethod
    async def start(self) -> None:
        """Start the stages (after the log is open, before the edge listens)."""

    @abstractmethod
    async def stop(self) -> None:
        """Processors snapshot, sinks write what they gathered, the rest is cancelled."""
