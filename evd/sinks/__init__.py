"""Delivery: every sink is an independent consumer of output streams.

evd.sinks.base is the contract, evd.sinks.delivery the loop every sink runs
in, evd.sinks.ledger and evd.sinks.audit the loss audit; one module per sink
type: files (the lake), sqlite (the warehouse), http (webhooks), kafka (a
topic another team consumes), stdout.
"""

from __future__ import annotations

from evd.core.config import (
    AnySinkConfig,
    FilesSinkConfig,
    HttpSinkConfig,
    KafkaSinkConfig,
    SqliteSinkConfig,
    StdoutSinkConfig,
)
from evd.sinks.base import Sink, SinkContext

__all__ = ["build_sink"]


def build_sink(cfg: AnySinkConfig, ctx: SinkContext) -> Sink:
    """The sink a ``sinks:`` entry describes (its module imported only when used)."""
    if isinstance(cfg, FilesSinkConfig):
        from evd.sinks.files import FilesSink

        return FilesSink(cfg, ctx)
    if isinstance(cfg, SqliteSinkConfig):
        from evd.sinks.sqlite import SqliteSink

        return SqliteSink(cfg, ctx)
    if isinstance(cfg, HttpSinkConfig):
        from evd.sinks.http import HttpSink

        return HttpSink(cfg, ctx)
    if isinstance(cfg, KafkaSinkConfig):
        from evd.sinks.kafka import KafkaSink

        return KafkaSink(cfg, ctx)
    if isinstance(cfg, StdoutSinkConfig):
        from evd.sinks.stdout import StdoutSink

        return StdoutSink(cfg, ctx)
    raise TypeError(f"no sink for {type(cfg).__name__}")
