"""Alerts under faults: a broker outage, a SIGKILL mid-escalation, and the privacy of notes."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.alerts_support import Watch, alert, db_path, query
from tests.support import Client, Daemon, Mosquitto, PersistentClient, wait_for
from tests.test_alerts_admin import admin


def distinct_levels(client: Client, topic: str, alert_id: str) -> list[int]:
    """Escalation levels received, in order, repeats folded (delivery is at least once)."""
    levels: list[int] = []
    for message in list(client.all):
        if message.topic != topic:
            continue
        body = message.json()
        if body["alert_id"] == alert_id and (not levels or levels[-1] != body["escalation"]):
            levels.append(body["escalation"])
    return levels


def outbox_levels(daemon: Daemon, alert_id: str, channel: str) -> list[int]:
    rows = query(daemon, "select payload from outbox where channel = ? order by id", channel)
    bodies = [json.loads(payload) for (payload,) in rows]
    return [b["escalation"] for b in bodies if b.get("alert_id") == alert_id]


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A test-owned broker whose persistence works under root too.

    Started as root, Mosquitto drops to the `mosquitto` user, which cannot write a
    root-owned temporary directory: it then silently keeps nothing across a restart
    (the plain `own_broker` fixture has that problem). `user root` keeps it as it is;
    Mosquitto ignores the option when not started as root.
    """
    mosq = Mosquitto(tmp_path / "mosquitto", extra="user root").start()
    yield mosq
    mosq.stop()


def test_crisis_survives_a_broker_outage(
    persistent_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Stored once, published at least once, though the broker was down for 10 s; the
    escalation that fell due during the outage is published when it returns."""
    own_broker = persistent_broker
    daemon = make_daemon(own_broker.port, ALERTS__ESCALATE_AFTER_S="3", ALERTS__MAX_ESCALATIONS="1")
    topic = f"{daemon.root}/alerts/crisis"
    subscriber = PersistentClient(own_broker.port).connect()
    subscriber.subscribe(topic)
    device = Client(own_broker.port).connect()
    try:
        device.publish(f"{daemon.root}/devices/d1/alerts", alert("out-1", kind="panic"))
        # The broker goes down right after it took the device's message: the gateway
        # may not even have received it yet, or not published the crisis, or not got
        # its PUBACK.
        own_broker.restart(down_s=10)
        wait_for(lambda: distinct_levels(subscriber, topic, "out-1") == [0, 1], timeout=30)
        assert query(daemon, "select count(*) from alerts where alert_id = 'out-1'") == [(1,)]
        assert outbox_levels(daemon, "out-1", "mqtt") == [0, 1]
        wait_for(
            lambda: (
                query(
                    daemon, "select count(*) from outbox where sent_at is null and channel = 'mqtt'"
                )
                == [(0,)]
            )
        )
    finally:
        device.close()
        subscriber.close()


def test_escalation_across_a_sigkill_neither_skips_nor_doubles(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, ALERTS__ESCALATE_AFTER_S="1", ALERTS__MAX_ESCALATIONS="4")
    topic = f"{daemon.root}/alerts/crisis"
    client.subscribe(topic)
    client.publish(f"{daemon.root}/devices/d1/alerts", alert("kill-1", kind="panic"))
    wait_for(lambda: 1 in distinct_levels(client, topic, "kill-1"))
    daemon.kill()
    # Down long enough for the next escalation to fall due while no process runs.
    time.sleep(1.5)
    daemon.start()
    wait_for(lambda: 4 in distinct_levels(client, topic, "kill-1"), timeout=30)
    client.quiet(2.0)
    assert distinct_levels(client, topic, "kill-1") == [0, 1, 2, 3, 4]
    # Exactly one outbox row per escalation, in each channel: none doubled, none skipped.
    assert outbox_levels(daemon, "kill-1", "mqtt") == [0, 1, 2, 3, 4]
    assert outbox_levels(daemon, "kill-1", "webhook") == []  # no endpoint subscribes
    assert query(
        daemon, "select escalation, next_escalation_at from alerts where alert_id = 'kill-1'"
    ) == [(4, None)]


def test_a_note_goes_nowhere_but_the_stored_record(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    marker = f"NOTE-{uuid.uuid4().hex}"
    daemon = make_daemon(
        broker.port,
        ALERTS__ESCALATE_AFTER_S="0.5",
        ALERTS__MAX_ESCALATIONS="1",
        LOG__LEVEL="debug",
    )
    root = daemon.root
    spy = Client(broker.port).connect().subscribe(f"{root}/#")
    watch = Watch(client, root)
    try:
        note = f"I wrote this myself {marker}"
        sent: list[dict[str, Any] | bytes] = [
            alert("p-crisis", kind="panic", note=note, mine=marker),
            alert("p-flag", kind="checkin", flags=["injury"], note=note, site_id="s1"),
            alert("p-well", mood=2, note=note),
            alert("p-none", mood=9, note=note),
            alert("p-crisis", kind="panic", note=note),  # a duplicate
            alert("p-bad", mood=11, note=note),  # rejected: schema
            alert("p-long", note=marker * 400),  # rejected: note over 8 KiB
            alert("p-mismatch", device_id="d9", note=note),  # rejected: device_mismatch
            f'{{"alert_id": "p-broken", "note": "{marker}'.encode(),  # rejected: malformed
            alert("p-kind", kind=marker, note=note),  # rejected: enum, value not echoed
        ]
        for body in sent:
            watch.send(body)
        wait_for(lambda: len(watch.on("devices/d1/alerts/ack")) >= len(sent))
        wait_for(lambda: {c["escalation"] for c in watch.crises()} >= {0, 1})
        wait_for(watch.wellness)
        client.publish(f"{root}/alerts/crisis/ack", {"alert_id": "p-flag", "by": "officer"})
        # Every admin view of alerts and of the quarantine.
        answers = [
            admin(client, root, "alerts/list"),
            admin(client, root, "alerts/list", classification="crisis"),
            admin(client, root, "quarantine/list"),
            admin(client, root, "stats"),
            *(admin(client, root, "alerts/get", alert_id=a) for a in ("p-crisis", "p-well")),
        ]
        assert all(answer["status"] == "ok" for answer in answers)
        wait_for(
            lambda: (
                query(
                    daemon, "select count(*) from outbox where sent_at is null and channel = 'mqtt'"
                )
                == [(0,)]
            )
        )
        spy.quiet(0.5)
        # Published: nothing but the devices' own messages carries the marker.
        inputs = f"{root}/devices/d1/alerts"
        published = [m for m in spy.all if m.topic != inputs]
        assert len(published) > 20
        leaks = [m.topic for m in published if marker.encode() in m.payload]
        assert leaks == []
        # Logged: never.
        assert marker not in daemon.log()
        assert "I wrote this" not in daemon.log()
        # Everything written (the outbox included):
        # only the stored alert records hold it, and the quarantine's raw bytes.
        with sqlite3.connect(db_path(daemon)) as conn:
            tables = [
                name
                for (name,) in conn.execute("select name from sqlite_master where type = 'table'")
            ]
            holders: dict[str, int] = {}
            for table in tables:
                for row in conn.execute(f"select * from {table}"):
                    if any(marker in str(value) for value in row):
                        holders[table] = holders.get(table, 0) + 1
            webhook_events = conn.execute(
                "select count(*) from outbox where channel = 'webhook'"
            ).fetchone()
            notes = dict(conn.execute("select alert_id, note from alerts").fetchall())
        assert holders == {"alerts": 4, "quarantine": 5}
        assert webhook_events[0] == 0  # no endpoint subscribes: nothing waits for one
        assert notes == {a: note for a in ("p-crisis", "p-flag", "p-well", "p-none")}
    finally:
        spy.close()
