"""The whole configuration: one YAML file decoded into msgspec Structs.

The core's sections are evd.core.config's, the ``sinks:`` entries the sections
of evd.sinks.registry's sink types (a tagged union on ``type``). Every field
has a default, so ``evd serve`` runs with no file at all. Unknown keys and
wrong types are errors that name the key path. Environment variables
``EVD_SECTION__KEY=value`` override the file (values are parsed as YAML scalars,
so ``EVD_SERVER__PORT=9000`` is an int and ``EVD_AUTH__KEYS=[a, b]`` a list).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import msgspec.yaml

from evd.core.config import (
    ROLES,
    AuthConfig,
    Base,
    ChartsConfig,
    IngestConfig,
    KafkaConfig,
    LimitsConfig,
    LogConfig,
    ProcessingConfig,
    ServerConfig,
    SnapshotConfig,
    validate_kafka,
    validate_sinks,
)
from evd.core.errors import ConfigError, explain_validation
from evd.sinks.lake.sink import FilesSinkConfig
from evd.sinks.registry import AnySinkConfig, check_streams
from evd.sinks.sqlite import SqliteSinkConfig

__all__ = ["Config", "dump_config", "load_config", "with_overrides"]

ENV_PREFIX = "EVD_"


def _default_sinks() -> list[AnySinkConfig]:
    # The lake and the warehouse.
    return [FilesSinkConfig(name="lake"), SqliteSinkConfig(name="warehouse")]


class Config(Base):
    """The whole evd configuration."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    processing: ProcessingConfig = msgspec.field(default_factory=ProcessingConfig)
    charts: ChartsConfig = msgspec.field(default_factory=ChartsConfig)
    snapshot: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    sinks: list[AnySinkConfig] = msgspec.field(default_factory=_default_sinks)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{name}: expected EVD_SECTION__KEY")
        try:
            value = msgspec.yaml.decode(raw.encode()) if raw else ""
        except msgspec.DecodeError:
            value = raw
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _validate(cfg: Config) -> None:
    if cfg.log.partitions < 1:
        raise ConfigError("log.partitions: must be >= 1")
    roles = cfg.server.roles
    if not roles or len(set(roles)) != len(roles):
        raise ConfigError("server.roles: list each of edge, process, deliver at most once")
    if set(roles) != set(ROLES) and cfg.log.backend != "kafka":
        raise ConfigError(
            "server.roles: a server runs every role unless log.backend is kafka"
            " (the embedded log lives on one machine)"
        )
    validate_kafka(cfg.kafka)
    if isinstance(cfg.server.workers, int) and cfg.server.workers < 1:
        raise ConfigError("server.workers: must be >= 1 or 'auto'")
    if not 0 < cfg.server.port < 65536 and cfg.server.port != 0:
        raise ConfigError("server.port: must be 0..65535")
    for key in cfg.auth.keys:
        if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", key):
            raise ConfigError("auth.keys: sha256 digests must be 'sha256:' + 64 hex digits")
    if cfg.log.segment_bytes < 4096:
        raise ConfigError("log.segment_bytes: must be >= 4096")
    for name in ("linger_timeout_s", "commit_timeout_s"):
        if getattr(cfg.limits, name) <= 0:
            raise ConfigError(f"limits.{name}: must be > 0")
    if cfg.limits.linger_max_bytes < 0:
        raise ConfigError("limits.linger_max_bytes: must be >= 0")
    if cfg.log.checkpoint_bytes < 4096:
        raise ConfigError("log.checkpoint_bytes: must be >= 4096")
    for name in ("max_bytes", "min_free_bytes"):
        if getattr(cfg.log, name) < 0:
            raise ConfigError(f"log.{name}: must be >= 0")
    pc = cfg.processing
    for name in ("max_out_of_orderness_ms", "idle_timeout_ms", "allowed_lateness_ms"):
        if getattr(pc, name) < 0:
            raise ConfigError(f"processing.{name}: must be >= 0")
    for name in ("dedup_max_ids", "session_gap_ms", "max_buffered_events"):
        if getattr(pc, name) < 1:
            raise ConfigError(f"processing.{name}: must be >= 1")
    if pc.dedup_window_s <= 0:
        raise ConfigError("processing.dedup_window_s: must be > 0")
    if cfg.charts.window_s < 1:
        raise ConfigError("charts.window_s: must be >= 1")
    if cfg.charts.retention_s < cfg.charts.window_s or cfg.charts.retention_s % cfg.charts.window_s:
        raise ConfigError("charts.retention_s: must be a positive multiple of charts.window_s")
    if cfg.snapshot.interval_s <= 0:
        raise ConfigError("snapshot.interval_s: must be > 0")
    validate_sinks(cfg.sinks)
    for i, sink in enumerate(cfg.sinks):
        check_streams(sink, f"sinks.{i}")


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read ``path`` (or defaults), apply ``EVD_*`` overrides, and validate.

    Raises ConfigError naming the key path and the reason.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        try:
            loaded = msgspec.yaml.decode(text) if text.strip() else {}
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        data = loaded
    _merge(data, _env_overrides(os.environ if environ is None else environ))
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(explain_validation(exc)) from None
    _validate(cfg)
    return cfg


def with_overrides(cfg: Config, **server: Any) -> Config:
    """Return ``cfg`` with the non-None ``server`` fields replaced (command-line flags)."""
    changes = {k: v for k, v in server.items() if v is not None}
    if not changes:
        return cfg
    new = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **changes))
    _validate(new)
    return new


def dump_config(cfg: Config) -> str:
    """The effective configuration as YAML."""
    return msgspec.yaml.encode(cfg).decode()
