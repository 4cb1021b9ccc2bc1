"""Configuration: YAML into Structs, errors that name the key path, EVD_* overrides,
command-line flags over the file."""

from __future__ import annotations

from pathlib import Path

import msgspec
import msgspec.yaml
import pytest

from evd.config import Config, dump_config, load_config, with_overrides
from evd.core.errors import ConfigError
from evd.core.log import Stream
from evd.sinks.registry import SINKS
from evd.sinks.stdout import StdoutSink


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "evd.yaml"
    path.write_text(text)
    return path


def test_no_file_means_defaults() -> None:
    cfg = load_config(None, environ={})
    assert cfg == Config()
    assert (cfg.server.port, cfg.log.fsync, cfg.auth.keys) == (8080, "always", ["evd-dev-key"])


def test_file_values_are_decoded_into_structs(tmp_path: Path) -> None:
    path = write(tmp_path, """
server: {port: 9001, drain_grace_s: 1.5}
limits:
  max_body_bytes: 1024
  rate_limit_events_per_s: 10
log: {fsync: interval, partitions: 2}
auth:
  keys: [k1, "sha256:%s"]
""" % ("ab" * 32))
    cfg = load_config(path, environ={})
    assert cfg.server.port == 9001 and cfg.server.drain_grace_s == 1.5
    assert cfg.limits.max_body_bytes == 1024 and cfg.limits.rate_limit_events_per_s == 10
    assert (cfg.log.fsync, cfg.log.partitions) == ("interval", 2)
    assert cfg.auth.keys == ["k1", "sha256:" + "ab" * 32]
    assert cfg.limits.header_timeout_s == 10.0  # untouched fields keep their defaults


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n"])
def test_empty_file_means_defaults(tmp_path: Path, text: str) -> None:
    assert load_config(write(tmp_path, text), environ={}) == Config()


@pytest.mark.parametrize(
    "text, path, reason",
    [
        ("limits: {max_body_byte: 5}", "limits.max_body_byte", "unknown key"),
        ("nope: {a: 1}", "nope", "unknown key"),
        ("log: {partitions: 2, extra: true}", "log.extra", "unknown key"),
        ("server: {port: abc}", "server.port", "Expected `int`"),
        ("limits: {header_timeout_s: soon}", "limits.header_timeout_s", "Expected `float`"),
        ("log: {fsync: sometimes}", "log.fsync", "sometimes"),
        ("auth: {keys: a-key}", "auth.keys", "Expected `array`"),
        ("auth: {enabled: maybe}", "auth.enabled", "Expected `bool`"),
        ("log: 5", "log", "Expected `object`"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key_path(
    tmp_path: Path, text: str, path: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), environ={})
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert reason in message


@pytest.mark.parametrize(
    "text, path",
    [
        ("log: {partitions: 0}", "log.partitions"),
        ("server: {workers: 0}", "server.workers"),
        ("server: {port: 70000}", "server.port"),
        ("auth: {keys: ['sha256:nothex']}", "auth.keys"),
        ("log: {segment_bytes: 100}", "log.segment_bytes"),
    ],
)
def test_out_of_range_values_name_the_key_path(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize("text", ["[1, 2]\n", "just a string\n", "a: [unclosed\n"])
def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="evd.yaml"):
        load_config(write(tmp_path, text), environ={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_config(tmp_path / "no-such.yaml", environ={})


def test_env_overrides_file_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9001, host: 0.0.0.0}\nlog: {fsync: always}\n")
    cfg = load_config(path, environ={
        "EVD_SERVER__PORT": "9000",
        "EVD_LOG__FSYNC": "never",
        "EVD_AUTH__KEYS": "[a, b]",
        "EVD_LIMITS__BODY_TIMEOUT_S": "2.5",
        "EVD_SLOW": "1",  # no section: not an override
        "PATH": "/bin",
    })
    assert cfg.server.port == 9000  # parsed as a YAML int
    assert cfg.server.host == "0.0.0.0"  # from the file, not overridden
    assert cfg.log.fsync == "never"
    assert cfg.auth.keys == ["a", "b"]
    assert cfg.limits.body_timeout_s == 2.5


@pytest.mark.parametrize(
    "name, value, path",
    [
        ("EVD_SERVER__PORT", "abc", "server.port"),
        ("EVD_NOPE__KEY", "1", "nope"),
        ("EVD_LOG__NOPE", "1", "log.nope"),
    ],
)
def test_bad_env_override_names_the_key_path(name: str, value: str, path: str) -> None:
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_config(None, environ={name: value})


def test_env_override_with_too_many_parts_is_an_error() -> None:
    with pytest.raises(ConfigError, match="EVD_SERVER__PORT__X"):
        load_config(None, environ={"EVD_SERVER__PORT__X": "1"})


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "server: {port: 9001, data_dir: /from/file}\n"), environ={})
    out = with_overrides(cfg, port=9002, host=None, data_dir="/from/flag", workers=None)
    assert (out.server.port, out.server.data_dir) == (9002, "/from/flag")
    assert out.server.host == "127.0.0.1"
    assert with_overrides(cfg, port=None) is cfg
    with pytest.raises(ConfigError, match="^server.port: "):
        with_overrides(cfg, port=-1)


def test_dump_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"EVD_LOG__PARTITIONS": "3", "EVD_SERVER__PORT": "0"})
    assert load_config(write(tmp_path, dump_config(cfg)), environ={}) == cfg


def test_the_shipped_config_file_lists_exactly_the_defaults() -> None:
    # configs/evd.yaml documents every key with its default: it must decode to
    # the defaults, and name every key the schema has.
    shipped = Path(__file__).resolve().parents[2] / "configs" / "evd.yaml"
    assert load_config(shipped, environ={}) == Config()
    raw = msgspec.yaml.decode(shipped.read_bytes())
    defaults = msgspec.to_builtins(Config())
    raw_sinks, default_sinks = raw.pop("sinks"), defaults.pop("sinks")
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in defaults.items()}
    assert [set(s) for s in raw_sinks] == [set(s) for s in default_sinks]


def test_sinks_are_a_typed_list_with_errors_naming_the_entry(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
sinks:
  - {name: hooks, type: http, url: "http://127.0.0.1:9/x", headers: {Authorization: Bearer k}}
  - {name: hooks2, type: http, url: "http://127.0.0.1:9/y", streams: [sessions]}
  - {name: out, type: stdout, event_types: [play, skip]}
"""), environ={})
    assert [s.name for s in cfg.sinks] == ["hooks", "hooks2", "out"]
    assert cfg.sinks[0].headers == {"Authorization": "Bearer k"}  # type: ignore[union-attr]
    assert cfg.sinks[1].streams == ["sessions"]
    assert cfg.sinks[2].event_types == ["play", "skip"]
    for body, error in [
        ("sinks: [{name: a, type: nope}]", "sinks.0.type: Invalid value 'nope'"),
        ("sinks: [{name: a, type: stdout, colour: red}]", "colour"),
        ("sinks: [{name: a, type: http}]", "url"),
        ("sinks: [{name: a, type: stdout}, {name: a, type: stdout}]", "sinks.1.name"),
        ("sinks: [{name: audit, type: stdout}]", "sinks.0.name: 'audit' is used by evd"),
        ("sinks: [{name: a, type: stdout, streams: [raw]}]", "sinks.0.streams: 'raw'"),
        ("sinks: [{name: a, type: stdout, event_types: [jump]}]", "sinks.0.event_types"),
        ("sinks: [{name: a, type: stdout, batch: {max_events: 0}}]", "sinks.0.batch"),
        ("sinks: [{name: a, type: http, url: ftp://x}]", "sinks.0.url"),
        ("sinks: [{name: a, type: http, url: 'http://u:p@h/x', headers: {authorization: k}}]",
         "sinks.0.headers: the url has credentials"),
        ("sinks: [{name: 'a b', type: stdout}]", "sinks.0.name"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, body), environ={})
        assert error in str(info.value), (body, str(info.value))
    assert load_config(write(tmp_path, "sinks: []"), environ={}).sinks == []
    many = ", ".join(f"{{name: s{i}, type: stdout}}" for i in range(16))
    with pytest.raises(ConfigError, match="^sinks: at most 15 sinks"):
        load_config(write(tmp_path, f"sinks: [{many}]"), environ={})


def test_a_sink_may_name_only_the_streams_its_type_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sink.streams is checked when the config is loaded (every type of today takes
    all five output streams, so a narrower one is made here)."""
    monkeypatch.setattr(StdoutSink, "streams", (Stream.EVENTS, Stream.LATE))
    body = "sinks: [{name: a, type: stdout, streams: [events, sessions]}]"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body), environ={})
    assert str(info.value) == "sinks.0.streams: a stdout sink takes events, late, not 'sessions'"
    ok = load_config(write(tmp_path, "sinks: [{name: a, type: stdout, streams: [late]}]"), environ={})
    assert ok.sinks[0].streams == ["late"]


def test_every_registered_sink_type_decodes_by_its_tag() -> None:
    """The sinks: union is the registry's: each section decodes by its ``type``."""
    for section in SINKS:
        tag = section.__struct_config__.tag
        required = {"url": "http://h/x", "topic": "t"}
        entry = {"name": "a", "type": tag, **{
            k: v for k, v in required.items() if k in section.__struct_fields__
        }}
        cfg = msgspec.convert({"sinks": [entry]}, Config)
        assert type(cfg.sinks[0]) is section
