"""Alerts end to end: a daemon process, a real broker, devices and operators as clients.

Each rule of the classification with its edges, the history rule across a
restart, idempotency, the crisis message and its escalations, acknowledgements,
the wellness cooldown. No timed assertions: short intervals, then polling.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    Watch,
    alert,
    days_ago,
    db_rows,
    shortest,
    stored_reasons,
    wait_for,
)

SUGGESTION_LOW = "Take a short break, get some water, and check in with a colleague."
SUGGESTIONS = {
    "low_mood": SUGGESTION_LOW,
    "high_stress": "Pause for a few slow breaths; ask for help with what can wait.",
}

CASES: list[tuple[dict[str, Any], str, list[str], Any]] = [
    # (fields, classification, reasons, wellness notification reason)
    ({"kind": "panic"}, "crisis", ["panic"], None),
    ({"mood": 2, "stress": 5}, "crisis", ["low_mood_high_stress"], None),
    ({"mood": 3, "stress": 5}, "wellness", ["low_mood", "high_stress"], "low_mood"),
    ({"mood": 2, "stress": 4}, "wellness", ["low_mood", "high_stress"], "low_mood"),
    ({"mood": 7, "stress": 5}, "wellness", ["high_stress"], "high_stress"),
    ({"mood": 7, "stress": 4}, "wellness", ["high_stress"], "high_stress"),
    ({"mood": 7, "stress": 3}, "none", [], None),
    ({"kind": "checkin", "mood": 4}, "wellness", ["low_mood"], "low_mood"),
    ({"kind": "checkin", "mood": 5}, "none", [], None),
    ({"flags": ["self_harm_risk"]}, "crisis", ["self_harm_risk"], None),
    ({"flags": ["suicidal_ideation"]}, "crisis", ["suicidal_ideation"], None),
    ({"kind": "checkin", "flags": ["violence"]}, "crisis", ["violence"], None),
    ({"kind": "checkin", "flags": ["injury"], "mood": 9}, "crisis", ["injury"], None),
    ({"kind": "checkin", "flags": ["tired"]}, "none", [], None),
    (
        {"kind": "panic", "flags": ["injury", "violence"], "mood": 1, "stress": 5},
        "crisis",
        ["panic", "violence", "injury", "low_mood_high_stress"],
        None,
    ),
]


def test_each_rule_end_to_end(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    watch = Watch(client, daemon.root)
    for index, (fields, _, _, _) in enumerate(CASES):
        # One user per case: neither a cooldown nor the history rule links them.
        watch.send(alert(f"c{index}", user_id=f"user-{index}", site_id="site-9", **fields))
    for index, (_, classification, reasons, _notified) in enumerate(CASES):
        ack = watch.ack_of(f"c{index}")
        assert ack == {
            "alert_id": f"c{index}",
            "status": "stored",
            "classification": classification,
        }
        assert stored_reasons(daemon, f"c{index}") == (classification, reasons)
    crisis_cases = [i for i, case in enumerate(CASES) if case[1] == "crisis"]
    wellness_cases = [i for i, case in enumerate(CASES) if case[3] is not None]
    watch.wait_crises(len(crisis_cases))
    wait_for(lambda: len(watch.wellness()) >= len(wellness_cases))
    watch.settled(daemon)
    crises = {c["alert_id"]: c for c in watch.crises()}
    assert sorted(crises) == sorted(f"c{i}" for i in crisis_cases)
    assert len(watch.crises()) == len(crisis_cases)
    stored_at = dict(db_rows(daemon.db_url, "select alert_id, stored_at from alerts"))
    for index in crisis_cases:
        crisis = crises[f"c{index}"]
        assert crisis == {
            "alert_id": f"c{index}",
            "user_id": f"user-{index}",
            "device_id": "d1",
            "site_id": "site-9",
            "reasons": CASES[index][2],
            "occurred_at": alert("x")["occurred_at"],
            "detected_at": shortest(stored_at[f"c{index}"]),
            "escalation": 0,
        }
    notes = {n["user_id"]: n for n in watch.wellness()}
    assert len(watch.wellness()) == len(wellness_cases)
    assert sorted(notes) == sorted(f"user-{i}" for i in wellness_cases)
    notification_ids = dict(db_rows(daemon.db_url, "select alert_id, notification_id from alerts"))
    for index in wellness_cases:
        assert notes[f"user-{index}"] == {
            "notification_id": notification_ids[f"c{index}"],
            "user_id": f"user-{index}",
            "reason": CASES[index][3],
            "suggestion": SUGGESTIONS[CASES[index][3]],
            "created_at": shortest(stored_at[f"c{index}"]),
        }
    # The topic names the user: `<root>/alerts/wellness/<user_id>`.
    assert {m.topic for m in watch.on("alerts/wellness/user-2")} == {
        f"{daemon.root}/alerts/wellness/user-2"
    }
    # No webhook endpoint subscribes to the alert events: none is written (tests/
    # test_notices.py checks the rows a subscribed event gets).
    assert db_rows(daemon.db_url, "select event_type from outbox where channel = 'webhook'") == []
    assert daemon.terminate() == 0


def test_sustained_low_mood_on_the_third_entry_across_a_restart(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    watch = Watch(client, daemon.root)
    entries: list[tuple[str, dict[str, Any], str, list[str]]] = [
        # Ten days ago: outside the 7 days of every entry below.
        ("h0", {"mood": 3, "occurred_at": days_ago(10)}, "wellness", ["low_mood"]),
        ("h1", {"mood": 5, "occurred_at": days_ago(3)}, "none", []),  # not low
        (
            "h2",
            {"kind": "checkin", "mood": 2, "occurred_at": days_ago(3)},
            "wellness",
            ["low_mood"],
        ),
        # Exactly 7 days before h5: outside its window (occurred_at - 7 days, occurred_at].
        ("h3", {"mood": 4, "occurred_at": days_ago(7)}, "wellness", ["low_mood"]),
        ("h4", {"mood": 4, "occurred_at": days_ago(2)}, "wellness", ["low_mood"]),
    ]
    for alert_id, fields, _, _ in entries:
        watch.send(alert(alert_id, user_id="sam", **fields))
        watch.ack_of(alert_id)
    daemon.terminate()
    daemon.start()
    later: list[tuple[str, dict[str, Any], str, list[str]]] = [
        ("h5", {"mood": 3, "occurred_at": days_ago(0)}, "wellness", ["low_mood"]),  # second
        ("h6", {"mood": 2, "occurred_at": days_ago(0)}, "wellness", ["sustained_low_mood"]),
        (
            "h7",
            {"mood": 4, "stress": 4, "occurred_at": days_ago(0)},
            "wellness",
            ["sustained_low_mood", "high_stress"],
        ),
    ]
    for alert_id, fields, _, _ in later:
        watch.send(alert(alert_id, user_id="sam", **fields))
        assert watch.ack_of(alert_id)["classification"] == "wellness"
    for alert_id, _, classification, reasons in entries + later:
        assert stored_reasons(daemon, alert_id) == (classification, reasons), alert_id
    # Notifications: low_mood once (the cooldown holds the rest), then the third entry's
    # sustained_low_mood once; h7 is inside both cooldowns.
    wait_for(lambda: len(watch.wellness()) >= 2)
    watch.settled(daemon)
    assert [(n["user_id"], n["reason"]) for n in watch.wellness()] == [
        ("sam", "low_mood"),
        ("sam", "sustained_low_mood"),
    ]
    assert db_rows(
        daemon.db_url, "select alert_id from alerts where notification_id is not null order by id"
    ) == [("h0",), ("h6",)]


def test_duplicates_answer_the_stored_classification_and_publish_nothing_more(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    watch = Watch(client, daemon.root)
    panic = alert("dup-1", kind="panic")
    watch.send(panic)
    watch.send(panic)
    wait_for(lambda: len(watch.on("devices/d1/alerts/ack")) >= 2)
    watch.wait_crises(1)
    # Even a resend with other values is the same alert: its stored record stands.
    watch.send(alert("dup-1", mood=9))
    wait_for(lambda: len(watch.on("devices/d1/alerts/ack")) >= 3)
    watch.settled(daemon)
    answers = [m.json() for m in watch.on("devices/d1/alerts/ack")]
    assert answers == [
        {"alert_id": "dup-1", "status": "stored", "classification": "crisis"},
        {"alert_id": "dup-1", "status": "duplicate", "classification": "crisis"},
        {"alert_id": "dup-1", "status": "duplicate", "classification": "crisis"},
    ]
    assert len(watch.crises()) == 1
    assert db_rows(daemon.db_url, "select count(*) from alerts") == [(1,)]


def test_rejections_are_answered_and_quarantined_unshown(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    watch = Watch(client, daemon.root)
    watch.send(alert("bad-1", mood=11))
    watch.send(alert("bad-2", device_id="d7"))
    watch.send(b"{not json")
    assert watch.ack_of("bad-1") == {
        "alert_id": "bad-1",
        "status": "rejected",
        "classification": None,
        "error": {"code": "schema", "message": "Expected `float` <= 10.0", "path": "mood"},
    }
    assert watch.ack_of("bad-2") == {
        "alert_id": "bad-2",
        "status": "rejected",
        "classification": None,
        "error": {
            "code": "device_mismatch",
            "message": "device_id is not the topic's device",
            "path": "device_id",
        },
    }
    assert watch.ack_of(None) == {
        "alert_id": None,
        "status": "rejected",
        "classification": None,
        "error": {
            "code": "malformed",
            "message": "not valid JSON: JSON is malformed: object keys must be strings (byte 1)",
        },
    }
    rows = db_rows(daemon.db_url, "select kind, code, path from quarantine order by id")
    assert rows == [
        ("alert", "schema", "mood"),
        ("alert", "device_mismatch", "device_id"),
        (
            "alert",
            "malformed",
            None,
        ),
    ]
    assert db_rows(daemon.db_url, "select count(*) from alerts") == [(0,)]


def test_v5_response_topic_gets_the_answer_with_correlation(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)
    client.subscribe(f"{daemon.root}/devices/d1/alerts/ack", "replies/me")
    client.publish(
        f"{daemon.root}/devices/d1/alerts",
        alert("v5-1", mood=9),
        response_topic="replies/me",
        correlation=b"corr-1",
    )
    (reply,) = client.expect(1)
    assert reply.topic == "replies/me"
    assert reply.correlation == b"corr-1"
    assert reply.json() == {"alert_id": "v5-1", "status": "stored", "classification": "none"}
    # There and only there: a later alert's answer on the ack topic is the next message.
    ack_topic = f"{daemon.root}/devices/d1/alerts/ack"
    client.publish(f"{daemon.root}/devices/d1/alerts", alert("v5-2", mood=9))
    before, fence = client.until(lambda m: m.topic == ack_topic)
    assert (before, fence.json()["alert_id"]) == ([], "v5-2")


def escalation_levels(watch: Watch, alert_id: str) -> list[int]:
    return [c["escalation"] for c in watch.crises() if c["alert_id"] == alert_id]


def test_escalation_until_acknowledged_or_the_limit(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port, ALERTS__ESCALATE_AFTER_S="1", ALERTS__MAX_ESCALATIONS="3")
    root = daemon.root
    watch = Watch(client, root)
    watch.send(alert("esc-acked", kind="panic"))
    watch.send(alert("esc-open", kind="panic", user_id="u2"))
    # esc-acked: acknowledged after its first escalation, by topic; nothing after that.
    wait_for(lambda: 1 in escalation_levels(watch, "esc-acked"))
    client.publish(f"{root}/alerts/crisis/ack", {"alert_id": "esc-acked", "by": "dana"})
    wait_for(
        lambda: (
            db_rows(
                daemon.db_url, "select acknowledged_by from alerts where alert_id = 'esc-acked'"
            )
            == [("dana",)]
        )
    )
    # esc-open: escalated up to max_escalations, then no more: none is scheduled, and
    # every one written has been published and has arrived.
    wait_for(lambda: 3 in escalation_levels(watch, "esc-open"))
    wait_for(
        lambda: (
            db_rows(
                daemon.db_url, "select count(*) from alerts where next_escalation_at is not null"
            )
            == [(0,)]
        )
    )
    watch.settled(daemon)
    assert escalation_levels(watch, "esc-open") == [0, 1, 2, 3]
    acked = escalation_levels(watch, "esc-acked")
    # The ack may cross an escalation already committed; none is published after it.
    assert acked in ([0, 1], [0, 1, 2])
    rows = db_rows(
        daemon.db_url,
        "select alert_id, escalation, next_escalation_at, acknowledged_by from alerts "
        "order by alert_id",
    )
    assert rows == [("esc-acked", len(acked) - 1, None, "dana"), ("esc-open", 3, None, None)]
    # Never early: each escalation written escalate_after_s after the previous one was
    # (how late it may be on a quiet machine is benchmarks/crisis_latency.py's).
    created = [
        (json.loads(payload)["escalation"], at)
        for payload, at in db_rows(
            daemon.db_url,
            "select payload, created_at from outbox where channel = 'mqtt' order by id",
        )
        if json.loads(payload)["alert_id"] == "esc-open"
    ]
    assert [level for level, _ in created] == [0, 1, 2, 3]
    gaps_s = [(b - a) / 1e6 for (_, a), (_, b) in itertools.pairwise(created)]
    assert all(gap >= 1.0 for gap in gaps_s), gaps_s
    events = db_rows(
        daemon.db_url,
        "select event_type, payload from outbox where channel = 'mqtt' order by id",
    )
    escalated = [json.loads(p) for e, p in events if e == "alert.crisis.escalated"]
    assert sorted((e["alert_id"], e["escalation"]) for e in escalated) == sorted(
        [("esc-open", 1), ("esc-open", 2), ("esc-open", 3)] + [("esc-acked", n) for n in acked[1:]]
    )
    # Unknown and repeated acks are harmless, and logged by id.
    client.publish(f"{root}/alerts/crisis/ack", {"alert_id": "esc-acked", "by": "eli"})
    client.publish(f"{root}/alerts/crisis/ack", {"alert_id": "nope", "by": "eli"})
    client.publish(f"{root}/alerts/crisis/ack", b"{}")

    def outcomes() -> list[tuple[str, str]]:
        return [
            (line["alert_id"], line["outcome"])
            for line in daemon.log_lines()
            if line.get("event") == "crisis ack"
        ]

    wait_for(lambda: len(outcomes()) >= 3)
    assert outcomes() == [
        ("esc-acked", "acknowledged"),
        ("esc-acked", "already_acknowledged"),
        ("nope", "unknown"),
    ]
    assert db_rows(
        daemon.db_url, "select acknowledged_by from alerts where alert_id = 'esc-acked'"
    ) == [("dana",)]
    assert daemon.terminate() == 0


def test_wellness_cooldown_is_held_in_the_database(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = make_daemon(broker.port)  # default cooldown: a day
    watch = Watch(client, daemon.root)
    watch.send(alert("w1", user_id="kim", mood=3))
    watch.send(alert("w2", user_id="kim", kind="checkin", mood=2))
    watch.send(alert("w3", user_id="kim", stress=5))  # another reason: its own cooldown
    for alert_id in ("w1", "w2", "w3"):
        assert watch.ack_of(alert_id)["classification"] == "wellness"
    wait_for(lambda: len(watch.wellness()) >= 2)
    # Both marked sent before the stop: a SIGTERM while a PUBACK is unread leaves its
    # row unsent, and the restarted daemon would publish it again (at least once).
    watch.settled(daemon)
    # A restart does not forget the cooldown.
    daemon.terminate()
    daemon.start()
    watch.send(alert("w4", user_id="kim", kind="checkin", mood=4))
    watch.ack_of("w4")
    watch.settled(daemon)
    assert [(n["reason"], n["suggestion"]) for n in watch.wellness()] == [
        ("low_mood", SUGGESTION_LOW),
        ("high_stress", "Pause for a few slow breaths; ask for help with what can wait."),
    ]
    # After the cooldown, the next trigger notifies again (and the suggestion is the config's).
    daemon.terminate()
    daemon.env["FIELDGATE_ALERTS__WELLNESS_COOLDOWN_S"] = "0.2"
    daemon.env["FIELDGATE_ALERTS__SUGGESTIONS__LOW_MOOD"] = "Call someone you trust."
    daemon.start()
    watch.send(alert("w5", user_id="kim", kind="checkin", mood=4))
    wait_for(lambda: len(watch.wellness()) >= 3)
    watch.settled(daemon)
    notes = watch.wellness()
    assert [(n["reason"], n["suggestion"]) for n in notes[2:]] == [
        ("low_mood", "Call someone you trust.")
    ]
    assert [n["notification_id"] for n in notes] == [
        row[0]
        for row in db_rows(
            daemon.db_url,
            "select notification_id from alerts where notification_id is not null order by id",
        )
    ]


@pytest.mark.parametrize("user_id", ["a/b", "x+#y", "50%"])
def test_user_ids_that_are_not_topic_levels_still_notify(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client, user_id: str
) -> None:
    daemon = make_daemon(broker.port)
    watch = Watch(client, daemon.root)
    watch.send(alert("t1", user_id=user_id, mood=1))
    wait_for(watch.wellness)
    (note,) = watch.wellness()
    assert note["user_id"] == user_id
    (message,) = [m for m in client.all if m.topic.startswith(f"{daemon.root}/alerts/wellness/")]
    level = message.topic.rsplit("/alerts/wellness/", 1)[1]
    assert "/" not in level and "+" not in level and "#" not in level
