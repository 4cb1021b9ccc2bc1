"""The stages an embedded-log worker runs beside its HTTP edge.

Worker ``k`` of ``n`` owns the partitions ``p`` with ``p % n == k``: it starts
their processors and delivery loops through the one wiring (evd.stages). Every
worker also follows the ``charts`` stream for the top-tracks API
(evd.edge.charts) and sweeps retention of its own sub-logs
(evd.core.log.embedded.retention; worker 0 also those of writers that no longer
run). Only offsets and wake-ups travel between workers, never events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evd.config import Config
from evd.core.log import Consumer, Stream
from evd.core.log.embedded.consumer import EmbeddedConsumer
from evd.core.log.embedded.producer import EmbeddedLog
from evd.core.log.embedded.retention import Retention
from evd.stages import WorkerStages, publish_gauges

__all__ = ["Pipeline", "owned_partitions"]


def owned_partitions(partitions: int, index: int, workers: int) -> list[int]:
    """The raw partitions worker ``index`` of ``workers`` processes."""
    return [p for p in range(partitions) if p % workers == index]


class Pipeline(WorkerStages):
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
        self.workers = workers
        self.data_dir = Path(cfg.server.data_dir)
        self._consumers: list[EmbeddedConsumer] = []
        super().__init__(cfg, lg, index, range(workers), on_failure)
        self.retention = Retention(
            lg, cfg.log, self.data_dir, retired_from=workers if index == 0 else None,
            keep_s={Stream.CHARTS: float(cfg.charts.retention_s)},
        )

    def open_consumer(self, name: str | None) -> Consumer:
        return EmbeddedConsumer(self.data_dir, name)

    async def start(self) -> None:
        owned = owned_partitions(self.cfg.log.partitions, self.index, self.workers)
        await self.stages.start_processors(owned)
        await self.stages.start_deliveries(owned)
        charts_consumer = EmbeddedConsumer(self.data_dir, None, reset="earliest")
        self._consumers.append(charts_consumer)
        self.stages.spawn(self.charts.follow(charts_consumer), "charts view")
        self.stages.spawn(publish_gauges(self.stages.running), "processor gauges")
        self.retention.start()

    async def stop(self) -> None:
        """Processors finish their pass and snapshot, sinks write what they gathered;
        the rest is cancelled."""
        await self.stages.close()
        await self.retention.stop()
        for consumer in self._consumers:
            await consumer.close()
