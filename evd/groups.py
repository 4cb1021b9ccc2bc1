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

import logging
from collections.abc import Callable

from evd.config import Config
from evd.core.log import Consumer, Stream
from evd.core.log.kafka.consumer import KafkaConsumer
from evd.core.log.kafka.group import GroupMember
from evd.core.log.kafka.producer import KafkaLog
from evd.stages import WorkerStages, publish_gauges

__all__ = ["KafkaPipeline"]

log = logging.getLogger(__name__)

#: Consumer groups whose members share out the partitions (no offsets of their own).
PROCESSORS_GROUP = "processors"
DELIVERERS_GROUP = "deliverers"


class KafkaPipeline(WorkerStages):
    """A worker's roles over the Kafka log (module docstring); the same surface as
    evd.pipeline.Pipeline (start, stop, charts)."""

    def __init__(
        self,
        cfg: Config,
        lg: KafkaLog,
        index: int,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.roles = set(cfg.server.roles)
        super().__init__(cfg, lg, index, (0,), on_failure)
        self._members: list[GroupMember] = []
        self._consumers: list[KafkaConsumer] = []

    def open_consumer(self, name: str | None) -> Consumer:
        return KafkaConsumer(self.cfg, name)

    async def start(self) -> None:
        if "edge" in self.roles:
            charts = KafkaConsumer(self.cfg, None)
            self._consumers.append(charts)
            self.stages.spawn(self.charts.follow(charts), "charts view")
        if "process" in self.roles:
            self.stages.spawn(publish_gauges(self.stages.running), "processor gauges")
            self._members.append(GroupMember(
                self.cfg, PROCESSORS_GROUP, Stream.RAW,
                self._processors_assigned, self._processors_revoked, self.on_failure,
            ))
        if "deliver" in self.roles:
            self._members.append(GroupMember(
                self.cfg, DELIVERERS_GROUP, Stream.EVENTS,
                self._deliverers_assigned, self._deliverers_revoked, self.on_failure,
            ))
        for member in self._members:
            await member.start()

    async def _processors_assigned(self, partitions: set[int]) -> None:
        started = await self.stages.start_processors(partitions)
        if started:
            log.info("processors of partitions %s started (worker %d)", started, self.index)

    async def _processors_revoked(self, partitions: set[int]) -> None:
        """Stop the processors of ``partitions`` within ``kafka.revoke_budget_s``."""
        stopped = await self.stages.stop_processors(partitions, self.cfg.kafka.revoke_budget_s)
        if stopped:
            log.info("processors of partitions %s stopped (worker %d)", stopped, self.index)

    async def _deliverers_assigned(self, partitions: set[int]) -> None:
        await self.stages.start_deliveries(partitions)
        if partitions:
            log.info("delivery of partitions %s started (worker %d)", sorted(partitions), self.index)

    async def _deliverers_revoked(self, partitions: set[int]) -> None:
        """Eager rebalancing: every delivery loop stops (each writes what it gathered
        and commits) and starts again over the partitions assigned next."""
        await self.stages.stop_deliveries()

    async def stop(self) -> None:
        """Processors snapshot, sinks write what they gathered, then the groups are left."""
        await self.stages.close(processors_budget_s=self.cfg.kafka.revoke_budget_s)
        for member in self._members:
            await member.close()
        for consumer in self._consumers:
            await consumer.close()
