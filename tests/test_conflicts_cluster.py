"""Conflicts under load and faults: two instances sharing the work, a broker restart.

The oracle is computed from the operations the test published (none carries
base_version, so the conflicts do not depend on which instance stored what, or
when); the records must equal it, group for group (members, fields, severity,
status, winners), none missing and none twice.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from storage.conflict_store import WAITING_SQL
from storage.outbox import topics as outbox_topics
from tests.conflict_oracle import Expected, expected_conflicts
from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    PersistentClient,
    free_port,
    stored_conflicts,
    sync_op,
    wait_for,
)

FIELDS = ["status", "title", "notes", "priority"]


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def generate(
    seed: int, devices: int, per_device: int, entities: int, tag: str
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic concurrent edits of a few hot entities, per device, in send order."""
    rng = random.Random(seed)
    base = datetime.now(UTC) - timedelta(minutes=40)
    out: dict[str, list[dict[str, Any]]] = {}
    for d in range(devices):
        ops = []
        for n in range(per_device):
            kind = rng.choices(["update", "create", "delete"], [0.9, 0.05, 0.05])[0]
            names = rng.sample(FIELDS, rng.choice([1, 1, 2]))
            changes = {name: {"old": None, "new": rng.choice(["a", "b", "c", 1])} for name in names}
            ops.append(
                sync_op(
                    f"{tag}-d{d}-{n}",
                    entity_id=f"hot{rng.randrange(entities)}",
                    entity_type=rng.choice(["task", "asset"]),
                    operation=kind,
                    changes={} if kind == "delete" else changes,
                    user_id=f"u{rng.randrange(3)}",
                    edited_at=iso(base + timedelta(seconds=60 * rng.randrange(20))),
                )
            )
        out[f"dev{d}"] = ops
    return out


def oracle(workload: dict[str, list[dict[str, Any]]]) -> set[Expected]:
    return expected_conflicts([(op, d) for d, ops in workload.items() for op in ops])


def publish_concurrently(
    port: int, root: str, workload: dict[str, list[dict[str, Any]]], batch: int = 3
) -> None:
    """One thread and one MQTT connection per device, all at once, in batches."""

    def device(name: str, ops: list[dict[str, Any]]) -> None:
        client = Client(port).connect()
        try:
            for start in range(0, len(ops), batch):
                part = ops[start : start + batch]
                payload: Any = part[0] if len(part) == 1 else {"batch_id": None, "ops": part}
                client.publish(f"{root}/devices/{name}/sync", payload)
        finally:
            client.close()

    threads = [threading.Thread(target=device, args=item) for item in workload.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def stored_ops_metric(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('fieldgate_sync_ops_total{status="stored"}'):
            return int(float(line.split()[-1]))
    return 0


@pytest.mark.postgres
def test_two_instances_find_every_pair_once(
    pg_url: str, own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Six devices hammer three hot entities through a shared subscription.

    Checked against a mutation: with the entity versions committed in a
    transaction of their own, before the rows (so the entity lock no longer
    covers them), this test fails with pairs missing, every time.
    """
    # pg_url first: its database is dropped after the daemons have stopped.
    # Its own broker: a shared subscription whose members come and go is state
    # the session broker of the other tests should not carry.
    broker = own_broker
    root = f"fg{uuid.uuid4().hex[:8]}"
    metrics = [free_port(), free_port()]
    daemons = [
        make_daemon(
            broker.port,
            db_url=pg_url,
            MQTT__SHARED_GROUP="g",
            MQTT__TOPIC_ROOT=root,
            METRICS__LISTEN=f"127.0.0.1:{port}",
            WRITER__MAX_WAIT_MS="1",
        )
        for port in metrics
    ]
    assert (
        daemons[0].env["FIELDGATE_MQTT__CLIENT_ID"] != daemons[1].env["FIELDGATE_MQTT__CLIENT_ID"]
    )
    workload = generate(seed=11, devices=6, per_device=40, entities=3, tag="c")
    total = sum(len(ops) for ops in workload.values())
    publish_concurrently(broker.port, root, workload)
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")

    def count() -> int:
        with psycopg.connect(plain) as conn:
            row = conn.execute("select count(*) from sync_log").fetchone()
            return int(row[0]) if row else 0

    def waiting() -> int:
        with psycopg.connect(plain) as conn:
            row = conn.execute(WAITING_SQL).fetchone()
            return int(row[0]) if row else 0

    wait_for(lambda: count() == total, timeout=60)
    wait_for(lambda: waiting() == 0, timeout=60)
    found = stored_conflicts(pg_url)
    with psycopg.connect(plain) as conn:
        versions = conn.execute(
            "select entity_type, entity_id, count(*), max(version), count(distinct version)"
            " from sync_log group by entity_type, entity_id"
        ).fetchall()
    shares = [stored_ops_metric(port) for port in metrics]
    assert sum(shares) == total
    assert all(share > 0 for share in shares), f"one instance did all the work: {shares}"
    # Versions stayed dense and unique per entity across the two writers.
    assert all(n == top == distinct for _t, _i, n, top, distinct in versions)
    expected = oracle(workload)
    assert sum(len(e.members) for e in expected) > 100
    assert len(found) == len(set(found)), "a conflict was recorded twice"
    assert set(found) - expected == set(), "records the definition does not hold"
    assert expected - set(found) == set(), "conflicts missing"
    assert [daemon.terminate() for daemon in daemons] == [0, 0]


def test_broker_restart_loses_no_notice(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(own_broker.port)
    root = daemon.root
    watcher = PersistentClient(own_broker.port, reconnect_max_s=2).connect()
    watcher.subscribe(f"{root}/conflicts", f"{root}/devices/+/conflicts")
    first = generate(seed=3, devices=3, per_device=30, entities=2, tag="p1")
    second = generate(seed=4, devices=3, per_device=30, entities=2, tag="p2")
    try:
        publish_concurrently(own_broker.port, root, first, batch=1)
        # The broker goes down while the daemon works through the backlog and
        # publishes its notices; what it had not confirmed waits in the outbox.
        own_broker.restart(down_s=1.0)
        publish_concurrently(own_broker.port, root, second, batch=1)
        db = daemon.db_url.split("///", 1)[1]
        total = sum(len(o) for o in first.values()) + sum(len(o) for o in second.values())

        def query(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(db) as conn:
                return list(conn.execute(sql).fetchall())

        wait_for(lambda: query("select count(*) from sync_log")[0][0] == total, timeout=60)
        wait_for(lambda: query(WAITING_SQL) == [(0,)], timeout=60)
        unsent = "select count(*) from outbox where sent_at is null and channel = 'mqtt'"
        wait_for(lambda: query(unsent) == [(0,)], timeout=60)
        rows = query("select topic, also_to, payload from outbox where channel = 'mqtt'")
        written = {
            (topic, bytes(payload))
            for first_topic, also_to, payload in rows
            for topic in outbox_topics({"topic": first_topic, "also_to": also_to})
        }

        def received() -> set[tuple[str, bytes]]:
            with watcher._lock:
                return {(m.topic, m.payload) for m in watcher.all}

        # Every message the outbox holds arrived (at least once), and nothing else.
        wait_for(lambda: written <= received(), timeout=60)
        assert received() == written
        assert {t for t, _p in written} >= {f"{root}/conflicts"}
        found = stored_conflicts(daemon.db_url)
        expected = oracle({d: first[d] + second[d] for d in first})
        assert len(found) == len(set(found))
        assert set(found) == expected
        assert expected
    finally:
        watcher.close()
