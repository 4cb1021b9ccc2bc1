"""The embedded log: segment files on local disk, one writer process per file.

``producer`` (EmbeddedLog: group commit, journal, checkpoints), ``consumer``
(EmbeddedConsumer over every writer's sub-logs), ``sublog`` (segments, published
durable ends, readers), ``wake`` (inotify wake-ups), ``framing`` and ``journal``
(the bytes on disk), ``retention`` (deleting what every consumer passed, the disk
cap) and ``layout`` (reading from tools, upgrade, recovery of retired writers).
"""
