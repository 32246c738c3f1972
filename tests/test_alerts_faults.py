"""Alerts under faults: a broker outage, a SIGKILL mid-escalation, and the privacy of notes."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from tests.support import (
    Admin,
    Client,
    Daemon,
    Mosquitto,
    PersistentClient,
    Watch,
    alert,
    db_rows,
    outbox_sent,
    sqlite_path,
    wait_for,
)


def distinct_levels(client: Client, topic: str, alert_id: str) -> list[int]:
    """Escalation levels in the order they first arrived. Delivery is at least once: a row
    a killed process had published but not yet marked is published again when its lease
    ends, after the later levels, so a repeat anywhere is folded into its first arrival."""
    levels: list[int] = []
    for message in list(client.all):
        if message.topic != topic:
            continue
        body = message.json()
        if body["alert_id"] == alert_id and body["escalation"] not in levels:
            levels.append(body["escalation"])
    return levels


def outbox_levels(daemon: Daemon, alert_id: str, channel: str) -> list[int]:
    rows = db_rows(
        daemon.db_url, "select payload from outbox where channel = ? order by id", channel
    )
    bodies = [json.loads(payload) for (payload,) in rows]
    return [b["escalation"] for b in bodies if b.get("alert_id") == alert_id]


def test_crisis_survives_a_broker_outage(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Stored once, published at least once, though the broker was down for 10 s; the
    escalation that fell due during the outage is published when it returns."""
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
        assert db_rows(daemon.db_url, "select count(*) from alerts where alert_id = 'out-1'") == [
            (1,)
        ]
        assert outbox_levels(daemon, "out-1", "mqtt") == [0, 1]
        wait_for(lambda: outbox_sent(daemon.db_url))
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
    # Down until the next escalation falls due, while no process runs.
    ((due_us,),) = db_rows(
        daemon.db_url, "select next_escalation_at from alerts where alert_id = 'kill-1'"
    )
    wait_for(lambda: time.time_ns() // 1000 > due_us, timeout=10)
    daemon.start()
    wait_for(lambda: 4 in distinct_levels(client, topic, "kill-1"), timeout=30)
    # None is scheduled any more, and all that was written has been published.
    wait_for(
        lambda: (
            db_rows(
                daemon.db_url, "select next_escalation_at from alerts where alert_id = 'kill-1'"
            )
            == [(None,)]
        )
    )
    # A row the killed process had claimed waits out its lease (30 s) to be published.
    Watch(client, daemon.root).settled(daemon, timeout=45)
    assert distinct_levels(client, topic, "kill-1") == [0, 1, 2, 3, 4]
    # Exactly one outbox row per escalation, in each channel: none doubled, none skipped.
    assert outbox_levels(daemon, "kill-1", "mqtt") == [0, 1, 2, 3, 4]
    assert outbox_levels(daemon, "kill-1", "webhook") == []  # no endpoint subscribes
    assert db_rows(
        daemon.db_url, "select escalation, next_escalation_at from alerts where alert_id = 'kill-1'"
    ) == [(4, None)]


VIEWS: list[tuple[str, dict[str, Any]]] = [
    ("alerts/list", {}),
    ("alerts/list", {"classification": "crisis"}),
    ("quarantine/list", {}),
    ("stats", {}),
    ("alerts/get", {"alert_id": "p-crisis"}),
    ("alerts/get", {"alert_id": "p-well"}),
]
"""Every admin view of alerts and of the quarantine."""


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
    admin = Admin(client, root)
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
        for command, args in VIEWS:
            admin.data(command, **args)
        # Every outbox message published and routed: the spy has it all before its fence.
        watch.settled(daemon)
        spy.fence()
        # Published: nothing but the devices' own messages carries the marker.
        inputs = f"{root}/devices/d1/alerts"
        published = [m for m in spy.all if m.topic != inputs]
        outbox_topics = Counter(
            topic
            for (topic,) in db_rows(
                daemon.db_url, "select topic from outbox where channel = 'mqtt'"
            )
        )
        assert outbox_topics[f"{root}/alerts/wellness/u1"] == 1
        requests = Counter(command for command, _ in VIEWS)
        assert Counter(m.topic for m in published) == {
            f"{root}/status": 1,
            f"{root}/health": 1,
            f"{root}/devices/d1/alerts/ack": len(sent),
            f"{root}/alerts/crisis/ack": 1,
            **outbox_topics,
            **{f"{root}/admin/request/{command}": n for command, n in requests.items()},
            **{f"{root}/admin/response/{command}": n for command, n in requests.items()},
        }
        leaks = [m.topic for m in published if marker.encode() in m.payload]
        assert leaks == []
        # Logged: never.
        assert marker not in daemon.log()
        assert "I wrote this" not in daemon.log()
        # Everything written (the outbox included):
        # only the stored alert records hold it, and the quarantine's raw bytes.
        with sqlite3.connect(sqlite_path(daemon.db_url)) as conn:
            tables = [
                name
                for (name,) in conn.execute("select name from sqlite_master where type = 'table'")
            ]
            holders: dict[str, int] = {}
            for table in tables:
                for row in conn.execute(f"select * from {table}"):
                    if any(marker in str(value) for value in row):
                        holders[table] = holders.get(table, 0) + 1
            events = conn.execute("select channel, event_type from outbox").fetchall()
            notes = dict(conn.execute("select alert_id, note from alerts").fetchall())
        assert holders == {"alerts": 4, "quarantine": 5}
        # No endpoint subscribes: no webhook row; each message out has its outbox row.
        assert [event for channel, event in events if channel == "webhook"] == []
        mqtt_events = Counter(event for channel, event in events if channel == "mqtt")
        assert sum(mqtt_events.values()) == sum(outbox_topics.values())
        assert notes == {a: note for a in ("p-crisis", "p-flag", "p-well", "p-none")}
    finally:
        spy.close()
