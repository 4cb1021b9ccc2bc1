"""The stages of one worker with ``log.backend: kafka``: its roles as process groups.

``evd serve --roles edge,process,deliver`` (any subset; all three by default):

- **edge**: the HTTP edge appends to the raw topic (evd.core.log.kafka.producer.KafkaLog), and
  follows the charts topic for the top-tracks API.
- **process**: the worker is a member of consumer group ``{prefix}processors``
  over the raw topic. For each partition assigned to it, a PartitionRunner
  (evd.state.runner) restores the partition's latest snapshot from the shared
  snapshot directory (``snapshot.dir``) and replays the raw topic from the
  snapshot's offsets. Before partitions are revoked (a pod joined, left, or
  was found dead), their runners stop and snapshot, within
  ``kafka.revoke_budget_s``; a runner that cannot is cancelled, and the next
  owner replays from the snapshot before. Raw offsets are committed (group
  ``{prefix}processor``) only after a snapshot that covers them.
- **deliver**: the worker is a member of group ``{prefix}deliverers`` over the
  ``events`` topic; for the partitions assigned to it (the same numbers in every
  output topic) it runs a delivery loop per sink and the audit stage
  (evd.sinks.delivery), each committing under its own name (group
  ``{prefix}{sink}``). A reassignment stops every loop (each writes what it
  gathered and commits) and starts them again over the new partitions.

Partition moves are eager (aiokafka's protocol): during a rebalance nobody
processes the partitions that move, so a partition has one processor at a time
whenever a member leaves cleanly; a member declared dead while still running
(a paused pod) may overlap with the new owner until it notices, which the
processors' deterministic outputs and the sinks' idempotent writes absorb.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from evd.core.config import Config
from evd.core.log import PROCESSOR
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.kafka.group import GroupMember
from evd.core.log.kafka.producer import KafkaLog
from evd.core.log.streams import Stream
from evd.edge.charts import ChartsView, make_view
from evd.pipeline import delivery_loops, publish_gauges, spawn
from evd.sinks.base import SinkContext
from evd.sinks.delivery import DeliveryLoop
from evd.sinks.ledger import Ledger
from evd.state.runner import PartitionRunner
from evd.state.snapshots import DirectoryStore

__all__ = ["KafkaPipeline", "snapshot_dir"]

log = logging.getLogger(__name__)

#: Consumer groups whose members share out the partitions (no offsets of their own).
PROCESSORS_GROUP = "processors"
DELIVERERS_GROUP = "deliverers"
#: How long the delivery loops get to write what they gathered on a reassignment.
DELIVERY_STOP_S = 30.0


def snapshot_dir(cfg: Config) -> Path:
    """Where the processors' snapshots live (``snapshot.dir``, else ``{data_dir}/state``)."""
    return Path(cfg.snapshot.dir or Path(cfg.server.data_dir) / "state")


class KafkaPipeline:
    """A worker's roles over the Kafka log (module docstring); the same surface as
    evd.pipeline.Pipeline (start, stop, charts)."""

    def __init__(
        self,
        cfg: Config,
        lg: KafkaLog,
        index: int,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.cfg = cfg
        self.lg = lg
        self.index = index
        self.on_failure = on_failure
        self.roles = set(cfg.server.roles)
        self.data_dir = Path(cfg.server.data_dir)
        self.charts: ChartsView = make_view(cfg)
        self.store = DirectoryStore(snapshot_dir(cfg))
        self.runners: dict[int, tuple[PartitionRunner, asyncio.Task[None]]] = {}
        self.deliveries: list[tuple[DeliveryLoop, asyncio.Task[None]]] = []
        self.ledger: Ledger | None = None
        self._members: list[GroupMember] = []
        self._consumers: list[KafkaConsumer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        if "edge" in self.roles:
            charts = KafkaConsumer(self.cfg, None)
            self._consumers.append(charts)
            self._spawn(self.charts.follow(charts), "charts view")
        if "process" in self.roles:
            self._spawn(
                publish_gauges(lambda: [runner for runner, _ in self.runners.values()]),
                "processor gauges",
            )
            self._members.append(GroupMember(
                self.cfg, PROCESSORS_GROUP, Stream.RAW,
                self._processors_assigned, self._processors_revoked, self.on_failure,
            ))
        if "deliver" in self.roles:
            self.ledger = Ledger(self.data_dir)
            self._members.append(GroupMember(
                self.cfg, DELIVERERS_GROUP, Stream.EVENTS,
                self._deliverers_assigned, self._deliverers_revoked, self.on_failure,
            ))
        for member in self._members:
            await member.start()

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        return spawn(self._tasks, coro, what, self.on_failure)

    # -- process --------------------------------------------------------------------------

    async def _processors_assigned(self, partitions: set[int]) -> None:
        if self._stopping:
            return
        new = sorted(p for p in partitions if p not in self.runners)
        for i, p in enumerate(new):
            consumer = KafkaConsumer(self.cfg, PROCESSOR)
            runner = PartitionRunner(
                p, self.cfg, self.lg, consumer, self.store, sources=(0,), phase=i / len(new)
            )
            await runner.restore()
            self.runners[p] = (runner, self._spawn(runner.run(), f"processor {p}"))
        if new:
            log.info("processors of partitions %s started (worker %d)", new, self.index)

    async def _processors_revoked(self, partitions: set[int]) -> None:
        """Stop the runners of ``partitions``; each snapshots as it stops."""
        going = [self.runners.pop(p) for p in sorted(partitions) if p in self.runners]
        if not going:
            return
        for runner, _ in going:
            runner.stop()
        tasks = [task for _, task in going]
        _, late = await asyncio.wait(tasks, timeout=self.cfg.kafka.revoke_budget_s)
        for task in late:
            task.cancel()
        if late:
            log.warning(
                "%d of %d processors did not snapshot within kafka.revoke_budget_s (%g s):"
                " their next owner replays from their previous snapshot",
                len(late), len(going), self.cfg.kafka.revoke_budget_s,
            )
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner, _ in going:
            await runner.consumer.close()
        log.info("processors of partitions %s stopped (worker %d)",
                 [r.partition for r, _ in going], self.index)

    # -- deliver --------------------------------------------------------------------------

    async def _deliverers_assigned(self, partitions: set[int]) -> None:
        if self._stopping or not partitions:
            return
        cfg = self.cfg
        ledger = self.ledger
        assert ledger is not None
        owned = sorted(partitions)
        # File names carry the lowest partition owned: unique among the deliverers
        # sharing a lake, since a partition has one owner at a time.
        ctx = SinkContext(
            data_dir=self.data_dir, worker=owned[0], workers=cfg.log.partitions,
            partitions=cfg.log.partitions, chart_window_ms=cfg.charts.window_s * 1000,
            kafka=cfg.kafka, open_consumer=lambda name: KafkaConsumer(cfg, name),
        )
        loops = delivery_loops(
            cfg, ctx, lambda name: KafkaConsumer(cfg, name), self.lg, ledger, owned
        )
        for loop in loops:
            await loop.start()
        for loop in loops:
            self.deliveries.append((loop, self._spawn(loop.run(), f"sink {loop.name}")))
        log.info("delivery of partitions %s started (worker %d)", owned, self.index)

    async def _deliverers_revoked(self, partitions: set[int]) -> None:
        """Stop every delivery loop: each writes what it gathered and commits."""
        going, self.deliveries = self.deliveries, []
        if not going:
            return
        for loop, _ in going:
            loop.stop()
        tasks = [task for _, task in going]
        _, late = await asyncio.wait(tasks, timeout=DELIVERY_STOP_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for loop, _ in going:
            await loop.consumer.close()

    # -- stop -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Processors snapshot, sinks write what they gathered, then the groups are left."""
        self._stopping = True
        await self._processors_revoked(set(self.runners))
        await self._deliverers_revoked(set())
        for member in self._members:
            await member.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.close()
        if self.ledger is not None:
            await self.ledger.close()
