"""The ``evd`` command as a user runs it: check-config, log-read, serve with a file,
environment overrides and flags."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from evdtest import ServerFactory, batch, free_port, make_event, post, run_cli

from evd.config import Config, load_config


def test_check_config_of_a_bad_file_prints_the_problem_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("limits:\n  max_body_byte: 5\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: limits.max_body_byte: unknown key" in result.stderr


def test_check_config_of_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: eighty\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "server.port" in result.stderr


def test_check_config_of_a_good_file_prints_the_effective_config_and_exits_0(
    tmp_path: Path,
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("log:\n  partitions: 3\n  fsync: interval\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    effective = msgspec.yaml.decode(result.stdout.encode(), type=Config)
    assert effective == load_config(path, environ={})
    assert (effective.log.partitions, effective.log.fsync) == (3, "interval")
    assert effective.server.port == 8080  # defaults are spelled out


def test_serve_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("log: {partitions: 0}\n")
    result = run_cli("serve", "--config", str(path), "--port", "0",
                     "--data-dir", str(tmp_path / "data"), timeout=20)
    assert result.returncode == 2
    assert "log.partitions" in result.stderr


def test_flags_override_the_config_file(servers: ServerFactory, tmp_path: Path) -> None:
    # The file names port 1 and another data_dir; the fixture passes --port 0 and
    # --data-dir, which must win.
    file_dir = tmp_path / "from-file"
    server = servers.start({"server": {"port": 1, "data_dir": str(file_dir)}})
    assert server.port not in (0, 1)
    assert post(server.port, batch([make_event("flag-1")])).status == 200
    assert (server.data_dir / "log" / "raw").is_dir()
    assert not file_dir.exists()


def test_env_override_sets_the_port(servers: ServerFactory) -> None:
    port = free_port()
    server = servers.start(None, port=None, env={"EVD_SERVER__PORT": str(port)})
    assert server.port == port
    assert post(port, batch([make_event("env-port-1")])).status == 200


def test_log_read_prints_raw_and_dead_letter_streams(servers: ServerFactory) -> None:
    server = servers.start({"log": {"partitions": 2}})
    good = [make_event(f"lr-{i}", user_id=f"u{i}") for i in range(3)]
    bad = make_event("lr-bad", geo={"country": "XX"})
    r = post(server.port, batch([*good, bad]))
    assert r.json()["accepted"] == 3

    raw = run_cli("log-read", "--data-dir", str(server.data_dir))
    assert raw.returncode == 0, raw.stderr
    lines = [json.loads(line) for line in raw.stdout.splitlines()]
    assert sorted(x["event_id"] for x in lines) == ["lr-0", "lr-1", "lr-2"]
    for line in lines:
        assert {"partition", "offset", "received_at", "skew_ms", "event_type"} <= line.keys()

    dead = run_cli("log-read", "--data-dir", str(server.data_dir), "--stream", "dead_letter")
    assert dead.returncode == 0, dead.stderr
    letters = [json.loads(line) for line in dead.stdout.splitlines()]
    assert len(letters) == 1
    assert letters[0]["index"] == 3
    assert letters[0]["error"].startswith("geo.country:")
    assert letters[0]["event"] == bad


def test_log_read_of_an_empty_data_dir_prints_nothing(tmp_path: Path) -> None:
    result = run_cli("log-read", "--data-dir", str(tmp_path))
    assert (result.returncode, result.stdout) == (0, "")
