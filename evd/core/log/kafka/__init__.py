"""The Kafka log (``log.backend: kafka``), split as aiokafka splits it.

``producer`` (KafkaLog: the Producer role, micro-batches per partition, ``acks=all``),
``consumer`` (KafkaConsumer: the Consumer role over assigned partitions), ``group``
(GroupMember: which partitions a process group's member owns) and ``topics``
(topic names, client options, creation).
"""
