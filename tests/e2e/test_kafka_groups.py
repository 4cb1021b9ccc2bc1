"""Process groups over a real Kafka-protocol broker (Tansu): edge x2, process x2 and
deliver x1, each its own ``evd serve --roles ...`` (a supervisor and its worker,
separate OS processes, separate data directories; the process pods share only
the snapshot directory, as pods share a volume).

- The sinks issue's end-to-end load and checks pass unchanged through them
  (tests/e2e/test_sinks_e2e.py: every accepted event once in sqlite and in the lake,
  sessions and charts equal to the batch computation field by field, the audit
  adds up), and both edge pods answer the top-tracks API as the warehouse's
  charts add up.
- SIGKILL of one process pod mid-run: its partitions move to the other, which
  restores their snapshots and replays the raw topic; the results are those of
  an undisturbed run (the same checks; only the lake, append-only files, may
  hold a replayed session twice, as identical rows).
- The broker frozen (SIGSTOP) while clients post: they get 503 with Retry-After
  within kafka.ack_timeout_s, never a 200 for what the broker did not take;
  once it runs again (SIGCONT) the same edge takes events again, every event
  that got a 200 reaches the warehouse and the lake, and the audit adds up.
  (Tansu keeps topics in memory only, so a restarted Tansu is an empty cluster:
  freezing it is how a broker outage that keeps its data is simulated here.)
- configs/kafka.yaml passes ``evd check-config`` and runs as the three groups
  with only what a pod spec would set from the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from evdtest import (
    EvdServer,
    ServerFactory,
    batch,
    freeze,
    make_event,
    post,
    request,
    run_cli,
    track_id,
)
from sinkcheck import lake_rows, query, wait_for
from test_sinks_e2e import CONFIG, check_delivered, post_load

from bench.tansu import Broker

pytestmark = pytest.mark.workers_independent

#: Consumer-group timing short enough for a test (a dead pod is noticed in 6 s).
KAFKA: dict[str, Any] = {
    "idempotence": False, "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
    "ack_timeout_s": 2.0, "revoke_budget_s": 5.0,
}


def kafka_config(bootstrap: str, prefix: str, snapshots: Path) -> dict[str, Any]:
    cfg = dict(CONFIG)
    cfg["log"] = dict(CONFIG["log"], backend="kafka")
    cfg["kafka"] = dict(KAFKA, bootstrap_servers=[bootstrap], topic_prefix=prefix)
    cfg["snapshot"] = dict(CONFIG["snapshot"], dir=str(snapshots))
    return cfg


class Groups:
    """The pods of one test: ``edges`` edge pods, ``processes`` process pods, one deliver pod."""

    def __init__(
        self, servers: ServerFactory, cfg: dict[str, Any], edges: int = 2, processes: int = 2
    ) -> None:
        self.cfg = cfg
        self.servers = servers
        self.deliver = self.pod("deliver")
        self.process = [self.pod("process") for _ in range(processes)]
        self.edges = [self.pod("edge") for _ in range(edges)]

    def pod(self, roles: str) -> EvdServer:
        return self.servers.start(self.cfg, args=["--roles", roles, "--workers", "1"])

    @property
    def edge_ports(self) -> list[int]:
        return [e.port for e in self.edges]

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in [self.deliver, *self.process, *self.edges])


def top_tracks(port: int) -> list[tuple[str, int]]:
    answer = request(port, "GET", "/v1/charts/top-tracks?window=1h&limit=10").json()
    return [(t["track_id"], t["plays"]) for t in answer["tracks"]]


def wait_assigned(groups: Groups, pods: list[EvdServer], timeout: float = 60.0) -> None:
    """Until each of ``pods`` logged that it runs processors (the group has settled)."""
    wait_for(
        "the processors' group to assign partitions",
        lambda: all("processors of partitions" in p.log_text() for p in pods),
        timeout=timeout,
    )


def test_process_groups_deliver_every_event_once(
    servers: ServerFactory, kafka_broker: Broker, kafka_prefix: str, rng: random.Random,
    tmp_path: Path,
) -> None:
    groups = Groups(servers, kafka_config(kafka_broker.bootstrap, kafka_prefix, tmp_path / "state"))
    wait_assigned(groups, groups.process)
    load = post_load(groups.edge_ports, rng)
    check_delivered(load, groups.deliver.data_dir, groups.deliver.port)
    # Every edge pod answers the top-tracks API from the charts topic, as the warehouse has it.
    totals: Counter[str] = Counter()
    for track, plays in query(groups.deliver.data_dir, "SELECT track_id, plays FROM charts"):
        totals[track] += plays
    want = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert len(want) == 10
    for port in groups.edge_ports:
        wait_for("the charts API on every edge pod", lambda port=port: top_tracks(port) == want,
                 timeout=30)
    # Each process pod ran some of the partitions.
    for pod in groups.process:
        assert "processors of partitions" in pod.log_text()
    # POSTs are refused where there is no edge.
    assert post(groups.deliver.port, batch([make_event("x")])).status == 404
    for pod in [*groups.edges, *groups.process, groups.deliver]:
        assert pod.stop() == 0, pod.log_text()


def test_a_killed_process_pod_moves_its_partitions_and_results_are_unchanged(
    servers: ServerFactory, kafka_broker: Broker, kafka_prefix: str, rng: random.Random,
    tmp_path: Path,
) -> None:
    groups = Groups(
        servers, kafka_config(kafka_broker.bootstrap, kafka_prefix, tmp_path / "state"), edges=1
    )
    wait_assigned(groups, groups.process)
    survivor, victim = groups.process
    killed = threading.Event()

    def kill_victim() -> None:
        # Mid-run: half the load posted, the processors busy with it; their
        # snapshots (every 1 s) cover part of what they did.
        time.sleep(1.0)
        victim.kill()
        killed.set()

    load = post_load(groups.edge_ports, rng, midway=kill_victim)
    assert killed.is_set()
    wait_for(
        "the survivor to take every partition",
        lambda: survivor.log_text().count("restored from its snapshot") > 0
        and "partitions [0, 1, 2, 3]" in survivor.log_text(),
        timeout=60,
    )
    check_delivered(load, groups.deliver.data_dir, groups.deliver.port, replayed=True)
    for pod in [*groups.edges, survivor, groups.deliver]:
        assert pod.stop() == 0, pod.log_text()


def test_a_frozen_broker_gives_503_and_every_200_reaches_the_warehouse(
    servers: ServerFactory, kafka_prefix: str, tmp_path: Path
) -> None:
    broker = Broker(log_path=tmp_path / "broker.log").start()
    try:
        cfg = kafka_config(broker.bootstrap, kafka_prefix, tmp_path / "state")
        groups = Groups(servers, cfg, processes=1)
        wait_assigned(groups, groups.process)
        assert broker.proc is not None
        pid = broker.proc.pid
        acked: set[str] = set()
        statuses: list[tuple[str, int, float]] = []
        seq = 0

        def post_some(phase: str, n: int, edges: list[int] | None = None) -> None:
            nonlocal seq
            for _ in range(n):
                ids = [f"{phase}-{seq}-{j}" for j in range(20)]
                seq += 1
                port = (edges or groups.edge_ports)[seq % len(edges or groups.edge_ports)]
                body = batch([make_event(i, user_id=f"u{seq % 50}", track_id=track_id(seq % 7))
                              for i in ids])
                started = time.monotonic()
                resp = post(port, body, timeout=30)
                took = time.monotonic() - started
                statuses.append((phase, resp.status, took))
                if resp.status == 200:
                    acked.update(ids)
                else:
                    assert resp.status == 503, resp.body
                    assert "retry-after" in resp.headers

        post_some("before", 20)
        freeze(pid)
        try:
            post_some("frozen", 6)
        finally:
            os.kill(pid, signal.SIGCONT)
        frozen = [(s, t) for p, s, t in statuses if p == "frozen"]
        assert {s for s, _ in frozen} == {503}, frozen
        # Bounded: an answer within ack_timeout_s (2 s) and a margin, never a hang.
        assert max(t for _, t in frozen) < 2.0 + 3.0, frozen
        # The same edges take events again once the broker runs (no restart): each
        # answers 200 within a bounded time, and from then on every POST is taken.
        for port in groups.edge_ports:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                post_some("recovering", 1, [port])
                if statuses[-1][1] == 200:
                    break
                time.sleep(0.5)
            assert statuses[-1][1] == 200, f"the edge on {port} did not recover"
        post_some("after", 20)
        assert [s for p, s, _ in statuses if p == "before"] == [200] * 20
        assert [s for p, s, _ in statuses if p == "after"] == [200] * 20
        data = groups.deliver.data_dir
        wait_for(
            "every acknowledged event in the warehouse",
            lambda: acked <= {r[0] for r in query(data, "SELECT event_id FROM events")},
            timeout=90,
        )
        wait_for(
            "every acknowledged event in the lake",
            lambda: acked <= {r["event_id"] for r in lake_rows(data / "lake", "events")},
            timeout=30,
        )
        # A 503'd request's records that the broker took late are in the log too:
        # accepted, and delivered like the rest.
        wait_for("the audit to add up",
                 lambda: run_cli("audit", "--data-dir", str(data)).returncode == 0, timeout=30)
        for pod in [*groups.edges, *groups.process, groups.deliver]:
            assert pod.stop() == 0, pod.log_text()
    finally:
        broker.stop()


def test_the_shipped_kafka_config_checks_and_runs_as_three_groups(
    servers: ServerFactory, kafka_broker: Broker, kafka_prefix: str, tmp_path: Path
) -> None:
    """configs/kafka.yaml as a user deploys it, with only what a pod spec sets from the
    environment changed (brokers, keys, one worker): an event posted to the edge pod
    reaches the warehouse and the team's topic, filtered by event type."""
    shipped = Path(__file__).resolve().parents[2] / "configs" / "kafka.yaml"
    checked = run_cli("check-config", str(shipped))
    assert checked.returncode == 0, checked.stderr
    assert "backend: kafka" in checked.stdout
    team_topic = f"{kafka_prefix}team"
    env = {
        "EVD_KAFKA__BOOTSTRAP_SERVERS": f"[{kafka_broker.bootstrap}]",
        "EVD_KAFKA__TOPIC_PREFIX": kafka_prefix,
        "EVD_KAFKA__IDEMPOTENCE": "false",
        "EVD_KAFKA__REPLICATION_FACTOR": "1",
        "EVD_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "EVD_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "EVD_AUTH__KEYS": "[evd-dev-key]",
        "EVD_SNAPSHOT__DIR": str(tmp_path / "state"),
        "EVD_LOG__PARTITIONS": "2",
    }
    # The team sink's topic is named in the file; point it at this test's own.
    config = tmp_path / "kafka.yaml"
    config.write_text(shipped.read_text().replace("topic: team-recs.plays", f"topic: {team_topic}"))
    pods = {
        roles: servers.start(None, args=["--config", str(config), "--roles", roles,
                                         "--workers", "1"], env=env)
        for roles in ("deliver", "process", "edge")
    }
    wait_assigned_to(pods["process"])
    events = [make_event("k-play", user_id="u1", event_type="play", track_id=track_id(1)),
              make_event("k-pause", user_id="u1", event_type="pause", track_id=track_id(1))]
    assert post(pods["edge"].port, batch(events)).status == 200
    data = pods["deliver"].data_dir
    wait_for("both events in the warehouse",
             lambda: {r[0] for r in query(data, "SELECT event_id FROM events")} == {
                 "k-play", "k-pause"}, timeout=60)
    rows = read_topic(kafka_broker.bootstrap, team_topic, 1)
    assert [(key, json.loads(value)["event_id"]) for key, value in rows] == [(b"u1", "k-play")]
    for pod in pods.values():
        assert pod.stop() == 0, pod.log_text()


def wait_assigned_to(pod: EvdServer) -> None:
    wait_for("the processors' group to assign partitions",
             lambda: "processors of partitions" in pod.log_text(), timeout=60)


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list[tuple[Any, Any]]:
    """(key, value) of the first ``count`` records of ``topic`` (waits up to ``timeout``)."""

    async def read() -> list[tuple[Any, Any]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            out: list[tuple[Any, Any]] = []
            deadline = time.monotonic() + timeout
            while len(out) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out += [(r.key, r.value) for r in records]
            # Nothing more than expected arrives (the filter kept the pause out).
            for records in (await consumer.getmany(timeout_ms=1500)).values():
                out += [(r.key, r.value) for r in records]
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())
