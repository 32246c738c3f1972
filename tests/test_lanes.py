"""Lanes: alerts and admin requests have an MQTT session of their own beside the sync one.

A broker delivers a session's messages in order, and the gateway reads no further
than it holds (`writer.max_in_process`): in one session, a panic alert or an
operator's request published after an outage's sync backlog waits for that backlog
to be stored. In the priority lane it does not.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from tests.support import (
    SPINE_ONLY,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    PersistentClient,
    alert,
    counter_ops,
    db_rows,
    queue_for,
    sqlite_path,
    wait_for,
)

DEVICES = 20
ENTITIES = 50


def test_a_crisis_and_an_admin_request_behind_a_sync_backlog_are_served_first(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """20,000 sync operations queued for the gateway while it was down, then a panic
    alert and an admin `health`: both are served while most of the backlog still waits
    (the gateway holds at most 100 messages of a lane at a time here, and the broker
    sends at most 1,000 before the gateway answers), and afterwards
    everything is stored once.

    Checked against: the alert and admin topics in the sync lane (all 20,000 were
    received ahead of the alert and of the answer)."""
    # The broker sends a resumed session's first window (ReceiveMaximum) ahead of the
    # SUBACK, and the sync lane reads it whole before it can pause: made small here.
    daemon = make_daemon(
        own_broker.port, WRITER__MAX_IN_PROCESS="100", MQTT__RECEIVE_MAXIMUM="1000", **SPINE_ONLY
    )
    assert daemon.terminate() == 0  # both of its sessions are now kept by the broker
    ops = counter_ops(20_000, "lane", DEVICES, ENTITIES)
    queue_for(own_broker.port, daemon.root, ops)
    watcher = Client(own_broker.port).connect()
    device = Client(own_broker.port).connect()
    try:
        watcher.subscribe(f"{daemon.root}/alerts/crisis")
        admin = Admin(watcher, daemon.root)
        device.publish(f"{daemon.root}/devices/lane-d0/alerts", alert("lane-1", kind="panic"))
        transaction = admin.send("health")
        # Not waiting for READY=1: it comes once the sync lane is subscribed, and the
        # broker sends that lane's first window ahead of the SUBACK.
        daemon.start(wait_ready=False)
        health = admin.answer("health", transaction, timeout=60)
        answered_us = time.time_ns() // 1000
        assert health["status"] == "ok"
        wait_for(lambda: watcher.on(f"{daemon.root}/alerts/crisis"), timeout=60)
        wait_for(
            lambda: (
                db_rows(daemon.db_url, "select count(distinct op_id) from sync_log")
                == [(len(ops),)]
            ),
            timeout=120,
        )
        assert db_rows(daemon.db_url, "select count(*) from sync_log") == [(len(ops),)]
        # What the gateway had received of the backlog before the alert, and before the
        # health answer was seen here: in one session, all of it.
        ((alert_received_us,),) = db_rows(daemon.db_url, "select received_at from alerts")
        before = "select count(*) from sync_log where received_at < ?"
        ((ahead_of_alert,),) = db_rows(daemon.db_url, before, alert_received_us)
        ((ahead_of_answer,),) = db_rows(daemon.db_url, before, answered_us)
        assert ahead_of_alert < len(ops) // 2
        assert ahead_of_answer < len(ops) // 2
        assert db_rows(daemon.db_url, "select alert_id from alerts") == [("lane-1",)]
        # No webhook endpoint: nothing yields to the backlog, and the log does not say so.
        assert "webhooks yield" not in daemon.log()
    finally:
        watcher.close()
        device.close()
    assert daemon.terminate() == 0


def test_a_session_kept_from_before_the_lanes_lets_go_of_alerts_after_taking_them(
    own_broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """An upgrade: the broker keeps the gateway's session of old, subscribed to the sync
    and the alert topics, with an alert queued. The sync lane takes that alert, and
    unsubscribes from alerts: the next alert comes in the priority lane only. (Here the
    priority session exists too, so the queued alert comes in both lanes: stored once,
    answered `duplicate` the second time.) Checked against: no unsubscribe (the later
    alert came twice as well)."""
    daemon = make_daemon(own_broker.port, **SPINE_ONLY)
    assert daemon.terminate() == 0
    old = PersistentClient(own_broker.port, client_id=daemon.env["FIELDGATE_MQTT__CLIENT_ID"])
    old.connect().subscribe(f"{daemon.root}/devices/+/alerts")
    old.close()
    device = Client(own_broker.port).connect()
    watcher = Client(own_broker.port).connect()
    try:
        watcher.subscribe(f"{daemon.root}/alerts/crisis", f"{daemon.root}/devices/+/alerts/ack")
        device.publish(f"{daemon.root}/devices/lane-d0/alerts", alert("old-1", kind="panic"))
        daemon.start()
        wait_for(lambda: watcher.on(f"{daemon.root}/alerts/crisis"))
        device.publish(f"{daemon.root}/devices/lane-d0/alerts", alert("new-1", kind="panic"))
        ack_topic = f"{daemon.root}/devices/lane-d0/alerts/ack"
        wait_for(lambda: len(watcher.on(ack_topic)) >= 3)
        time.sleep(1)  # a second answer to new-1, if one comes, comes within this
        watcher.fence()
        acks = [m.json() for m in watcher.on(ack_topic)]
        assert sorted((a["alert_id"], a["status"]) for a in acks) == [
            ("new-1", "stored"),
            ("old-1", "duplicate"),
            ("old-1", "stored"),
        ]
        assert db_rows(daemon.db_url, "select alert_id from alerts order by alert_id") == [
            ("new-1",),
            ("old-1",),
        ]
        assert "mqtt disconnected" not in daemon.log()
    finally:
        device.close()
        watcher.close()
    assert daemon.terminate() == 0


def test_admin_is_answered_while_sync_waits_for_a_stalled_commit(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """A commit that cannot finish (another process holds SQLite's write lock) and 150
    operations, where the gateway holds 100 messages a lane: the sync lane stops reading
    until commits go through; `health`, published after the operations, comes in the
    priority lane all the while and is answered, soon saying why. Then the lock goes and
    every operation is stored once.

    Checked against: admin requests in the sync lane (no answer while the lock holds)."""
    daemon = make_daemon(
        broker.port, WRITER__MAX_IN_PROCESS="100", LOG__LEVEL="debug", **SPINE_ONLY
    )
    ops = counter_ops(150, "stall", DEVICES, ENTITIES)
    client = Client(broker.port).connect()
    lock = sqlite3.connect(sqlite_path(daemon.db_url), isolation_level=None)
    try:
        admin = Admin(client, daemon.root)
        lock.execute("BEGIN IMMEDIATE")
        for device, op in ops:
            client.publish(f"{daemon.root}/devices/{device}/sync", op)
        wait_for(lambda: "intake paused" in daemon.log(), timeout=30)
        wait_for(lambda: admin.data("health")["checks"]["database"]["ok"] is False, timeout=60)
        assert db_rows(daemon.db_url, "select count(*) from sync_log") == [(0,)]
        lock.execute("COMMIT")
        wait_for(
            lambda: db_rows(daemon.db_url, "select count(*) from sync_log") == [(len(ops),)],
            timeout=60,
        )
        assert sorted(
            op_id for (op_id,) in db_rows(daemon.db_url, "select op_id from sync_log")
        ) == sorted(op["op_id"] for _device, op in ops)
    finally:
        lock.close()
        client.close()
    assert daemon.terminate() == 0
