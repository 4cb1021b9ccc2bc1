"""Every sink type evd knows: its config section and its class, one line each.

A sink type is one module holding its section (a ``SinkConfig`` subclass
tagged with the ``type:`` a ``sinks:`` entry names, checking its own fields in
``validate``) and its ``Sink`` class. Adding one is that module and one line in
``SINKS``: the ``sinks:`` union evd.config decodes (``AnySinkConfig``) and
``build_sink`` are derived from it.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias, cast

from evd.core.config import SinkConfig
from evd.core.errors import ConfigError
from evd.sinks.base import Sink, SinkContext
from evd.sinks.http import HttpSink, HttpSinkConfig
from evd.sinks.kafka import KafkaSink, KafkaSinkConfig
from evd.sinks.lake.sink import FilesSink, FilesSinkConfig
from evd.sinks.sqlite import SqliteSink, SqliteSinkConfig
from evd.sinks.stdout import StdoutSink, StdoutSinkConfig

__all__ = ["SINKS", "AnySinkConfig", "build_sink", "check_streams"]


#: section -> sink class, one line per sink type. The class is built as
#: ``cls(cfg, ctx)`` (cfg: that section, ctx: evd.sinks.base.SinkContext).
SINKS: dict[type[SinkConfig], type[Sink]] = {
    FilesSinkConfig: FilesSink,
    SqliteSinkConfig: SqliteSink,
    HttpSinkConfig: HttpSink,
    KafkaSinkConfig: KafkaSink,
    StdoutSinkConfig: StdoutSink,
}

if TYPE_CHECKING:
    AnySinkConfig: TypeAlias = SinkConfig
else:
    #: The tagged union of every section in SINKS (``type:`` picks the member).
    AnySinkConfig = functools.reduce(operator.or_, SINKS)


def check_streams(sink: SinkConfig, where: str) -> None:
    """ConfigError when ``sink`` names a stream its type does not take (Sink.streams)."""
    takes = SINKS[type(sink)].streams
    for stream in sink.streams:
        if stream not in takes:
            raise ConfigError(
                f"{where}.streams: a {type(sink).__struct_config__.tag} sink takes"
                f" {', '.join(takes)}, not {stream!r}"
            )


def build_sink(cfg: SinkConfig, ctx: SinkContext) -> Sink:
    """The sink a ``sinks:`` entry describes."""
    make = cast(Callable[[SinkConfig, SinkContext], Sink], SINKS[type(cfg)])
    return make(cfg, ctx)
