"""`alerts/list`, `alerts/get`, `alerts/ack` over the admin protocol, and the alert metrics."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.support import (
    Admin,
    Client,
    Daemon,
    Mosquitto,
    Watch,
    alert,
    days_ago,
    db_rows,
    free_port,
    from_us,
    iso,
    shortest,
    wait_for,
)


def test_list_get_and_ack(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    metrics_port = free_port()
    daemon = make_daemon(broker.port, METRICS__LISTEN=f"127.0.0.1:{metrics_port}")
    root = daemon.root
    watch = Watch(client, root)
    admin = Admin(client, root)
    sent = [
        alert("l1", user_id="ann", kind="panic", note="private words"),
        alert("l2", user_id="ann", mood=3, occurred_at=days_ago(1)),
        alert("l3", user_id="bob", mood=8),
        alert("l4", user_id="bob", flags=["injury"], site_id="s1"),
        alert("l5", user_id="cy", stress=5),
    ]
    for body in sent:
        watch.send(body)
        watch.ack_of(body["alert_id"])

    def ids(answer: dict[str, Any]) -> list[str]:
        assert answer["status"] == "ok", answer
        return [item["alert_id"] for item in answer["data"]["items"]]

    assert ids(admin("alerts/list")) == ["l5", "l4", "l3", "l2", "l1"]
    assert ids(admin("alerts/list", classification="crisis")) == ["l4", "l1"]
    assert ids(admin("alerts/list", classification="wellness")) == ["l5", "l2"]
    assert ids(admin("alerts/list", user_id="bob")) == ["l4", "l3"]
    assert ids(admin("alerts/list", acknowledged=False)) == ["l4", "l1"]
    assert ids(admin("alerts/list", acknowledged=True)) == []
    # Pages: newest first, the cursor continues below the last item.
    first = admin("alerts/list", limit=2)
    assert ids(first) == ["l5", "l4"]
    second = admin("alerts/list", limit=2, cursor=first["data"]["next_cursor"])
    assert ids(second) == ["l3", "l2"]
    third = admin("alerts/list", limit=2, cursor=second["data"]["next_cursor"])
    assert ids(third) == ["l1"] and third["data"]["next_cursor"] is None
    assert admin.error("alerts/list", cursor="forged") == {
        "code": "invalid_args",
        "message": "not a cursor of this gateway",
        "path": "cursor",
    }
    # since: received at or after.
    ((received_l3,),) = db_rows(
        daemon.db_url, "select received_at from alerts where alert_id = 'l3'"
    )
    assert ids(admin("alerts/list", since=shortest(received_l3))) == ["l5", "l4", "l3"]

    # The whole record, as stored, but never its note nor its raw payload.
    def stored(alert_id: str) -> dict[str, Any]:
        ((received, stored_at, notification, next_at, acked_at, acked_by),) = db_rows(
            daemon.db_url,
            "select received_at, stored_at, notification_id, next_escalation_at,"
            " acknowledged_at, acknowledged_by from alerts where alert_id = ?",
            alert_id,
        )
        return {
            "received_at": shortest(received),
            "stored_at": shortest(stored_at),
            "notification_id": notification,
            "next_escalation_at": None if next_at is None else shortest(next_at),
            "acknowledged_at": None if acked_at is None else shortest(acked_at),
            "acknowledged_by": acked_by,
        }

    l1 = {
        "alert_id": "l1",
        "device_id": "d1",
        "user_id": "ann",
        "kind": "panic",
        "occurred_at": sent[0]["occurred_at"],
        "mood": None,
        "stress": None,
        "energy": None,
        "flags": [],
        "site_id": None,
        "classification": "crisis",
        "reasons": ["panic"],
        "escalation": 0,
    }
    got = admin.data("alerts/get", alert_id="l1")
    assert got == {**l1, **stored("l1")}
    assert got["next_escalation_at"] is not None
    assert got["acknowledged_at"] is None
    assert admin.error("alerts/get", alert_id="nope") == {
        "code": "invalid_args",
        "message": "no alert with that alert_id",
        "path": "alert_id",
    }

    acked = admin.data("alerts/ack", alert_id="l1", by="officer-1")
    after = admin.data("alerts/get", alert_id="l1")
    assert after == {**l1, **stored("l1")}
    assert (after["acknowledged_by"], after["next_escalation_at"]) == ("officer-1", None)
    assert acked == {
        "alert_id": "l1",
        "status": "acknowledged",
        "acknowledged_at": after["acknowledged_at"],
        "acknowledged_by": "officer-1",
    }
    assert admin.data("alerts/ack", alert_id="l1", by="officer-2") == {
        **acked,
        "status": "already_acknowledged",
    }
    assert admin.error("alerts/ack", alert_id="l3", by="officer-1") == {  # not a crisis
        "code": "invalid_args",
        "message": "no crisis alert with that alert_id",
        "path": "alert_id",
    }
    assert ids(admin("alerts/list", acknowledged=True)) == ["l1"]
    assert ids(admin("alerts/list", acknowledged=False)) == ["l4"]

    # Metrics: alerts by classification, open crises, the receipt-to-publication histogram.
    stats = admin.data("stats")
    assert stats["alerts"] == {"crisis": 2, "wellness": 2, "none": 1}

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    wait_for(lambda: "fieldgate_open_crises 1.0" in scrape())
    text = scrape()
    assert 'fieldgate_alerts_total{classification="crisis"} 2.0' in text
    assert "fieldgate_crisis_publish_seconds_count 2.0" in text
    assert "fieldgate_crisis_escalations_total 0.0" in text


def test_rules_from_the_config_file_and_reload(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(
        broker.port,
        config_text='[alerts]\ncrisis_flags = ["fall"]\n\n'
        '[alerts.suggestions]\nhigh_stress = "Breathe."\n',
    )
    root = daemon.root
    watch = Watch(client, root)
    admin = Admin(client, root)
    watch.send(alert("r1", kind="checkin", flags=["fall"]))
    watch.send(alert("r2", kind="checkin", flags=["injury"]))
    watch.send(alert("r3", kind="checkin", stress=4))
    assert watch.ack_of("r1")["classification"] == "crisis"
    assert watch.ack_of("r2")["classification"] == "none"
    assert watch.ack_of("r3")["classification"] == "wellness"
    wait_for(lambda: [n["suggestion"] for n in watch.wellness()] == ["Breathe."])
    daemon.config_path.write_text('[alerts]\ncrisis_flags = ["injury"]\n')
    assert admin.data("config/reload") == {"reloaded": True, "needs_restart": []}
    watch.send(alert("r4", kind="checkin", flags=["fall"]))
    watch.send(alert("r5", kind="checkin", flags=["injury"]))
    assert watch.ack_of("r4")["classification"] == "none"
    assert watch.ack_of("r5")["classification"] == "crisis"


def test_quarantine_list_never_shows_a_rejected_alert(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """A rejected alert's raw bytes may hold a person's note: `quarantine/list` shows
    `payload` null and its exact size (PROTOCOL.md, Errors); other kinds show theirs.

    Checked against: `shown_payload` showing an alert's bytes like any other kind's."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    watch = Watch(client, root)
    admin = Admin(client, root)
    raw_alert = json.dumps(alert("q-1", mood=11, note="private words")).encode()
    watch.send(raw_alert)
    watch.ack_of("q-1")
    raw_ack = b'{"alert_id": "q-1"}'
    client.publish(f"{root}/alerts/crisis/ack", raw_ack)
    wait_for(lambda: db_rows(daemon.db_url, "select count(*) from quarantine") == [(2,)])
    ids = [row[0] for row in db_rows(daemon.db_url, "select id from quarantine order by id")]
    # quarantine/list writes every time to the microsecond
    received = [
        iso(from_us(r), "microseconds")
        for (r,) in db_rows(daemon.db_url, "select received_at from quarantine order by id")
    ]
    page = admin.data("quarantine/list")
    assert page == {
        "items": [
            {
                "id": ids[1],
                "received_at": received[1],
                "topic": f"{root}/alerts/crisis/ack",
                "device_id": None,
                "kind": "crisis_ack",
                "error": {
                    "code": "schema",
                    "message": "Object missing required field `by`",
                    "path": "by",
                },
                "payload": raw_ack.decode(),
                "payload_bytes": len(raw_ack),
            },
            {
                "id": ids[0],
                "received_at": received[0],
                "topic": f"{root}/devices/d1/alerts",
                "device_id": "d1",
                "kind": "alert",
                "error": {"code": "schema", "message": "Expected `float` <= 10.0", "path": "mood"},
                "payload": None,
                "payload_bytes": len(raw_alert),
            },
        ],
        "next_cursor": None,
    }
    assert b"private words" not in b"".join(m.payload for m in client.all if "admin" in m.topic)
