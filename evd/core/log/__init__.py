"""The log: the two roles every stage is written against, its streams, and its record format.

Stages depend on this package's top only: ``Producer`` and ``Consumer`` (evd.core.log.roles),
the ``Stream`` names and the named consumers (evd.core.log.streams), and the record format
(evd.core.log.records). The two backends live below it and are chosen once, by the worker:
``embedded`` (segment files on local disk) and ``kafka`` (aiokafka).
"""

from evd.core.log.roles import (
    Append,
    Consumer,
    ConsumerRecord,
    InvalidOffset,
    Lag,
    Producer,
    Record,
    SubLog,
    TopicPartition,
    partition_for,
    partitions_for,
)
from evd.core.log.streams import PROCESSOR, Stream

__all__ = [
    "PROCESSOR",
    "Append",
    "Consumer",
    "ConsumerRecord",
    "InvalidOffset",
    "Lag",
    "Producer",
    "Record",
    "Stream",
    "SubLog",
    "TopicPartition",
    "partition_for",
    "partitions_for",
]
