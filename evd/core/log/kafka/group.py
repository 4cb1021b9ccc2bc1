"""Group membership: which partitions of a topic a process group's member owns.

A GroupMember is a member of one consumer group per role that reads nothing
itself and calls the role back when partitions are revoked or assigned (the
wiring, evd.stages, starts and stops the stages of those partitions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP

from evd.core.log.kafka.topics import client_options, start_with_retry, topic_name

if TYPE_CHECKING:
    from evd.config import Config

__all__ = ["GroupMember"]

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    async def on_partitions_revoked(self, revoked: set[KafkaTP]) -> None:
        await self.member._revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[KafkaTP]) -> None:
        await self.member._assigned(assigned)


class GroupMember:
    """One process's membership in consumer group ``{prefix}{group}`` over
    ``topic``'s partitions: reads nothing, calls ``on_revoked`` (before the
    partitions go, awaited: the time a processor has to snapshot) and
    ``on_assigned`` with partition numbers. Errors in them go to ``on_failure``.
    """

    def __init__(
        self,
        cfg: Config,
        group: str,
        stream: str,
        on_assigned: Callable[[set[int]], Awaitable[None]],
        on_revoked: Callable[[set[int]], Awaitable[None]],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        k = cfg.kafka
        self.k = k
        self.group = f"{k.topic_prefix}{group}"
        self.topic = topic_name(k, stream)
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.on_failure = on_failure
        self.partitions: set[int] = set()
        self._consumer = AIOKafkaConsumer(
            **client_options(k),
            group_id=self.group,
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            rebalance_timeout_ms=int(k.revoke_budget_s * 1000) + k.session_timeout_ms,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await start_with_retry(self._consumer, self.k, f"member of {self.group}")
        self._consumer.subscribe([self.topic], listener=_Listener(self))
        self._task = asyncio.get_running_loop().create_task(self._poll())
        self._task.add_done_callback(self._poll_ended)

    def _poll_ended(self, task: asyncio.Task[None]) -> None:
        # aiokafka retries what is transient itself; an error out of getmany is
        # fatal to the membership (authorization, a fenced member): the worker stops.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("kafka: group %s: membership failed: %r", self.group, exc)
            self.on_failure(exc)

    async def _poll(self) -> None:
        # Partitions are paused as they come: getmany only keeps the membership alive.
        while True:
            await self._consumer.getmany(timeout_ms=1000)

    async def _revoked(self, partitions: set[int]) -> None:
        self.partitions -= partitions
        try:
            await self.on_revoked(partitions)
        except Exception as exc:  # noqa: BLE001 (reported, the worker stops)
            self.on_failure(exc)

    async def _assigned(self, assigned: set[KafkaTP]) -> None:
        self._consumer.pause(*assigned)
        partitions = {tp.partition for tp in assigned}
        self.partitions = partitions
        log.info("kafka: group %s assigned partitions %s", self.group, sorted(partitions))
        try:
            await self.on_assigned(partitions)
        except Exception as exc:  # noqa: BLE001 (reported, the worker stops)
            self.on_failure(exc)

    async def close(self) -> None:
        """Leave the group (its partitions move to the others at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._consumer.stop()
