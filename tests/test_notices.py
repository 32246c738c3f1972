"""The messages alerts and conflicts cause, as outbox records, on the handlers alone.

A webhook row is written only for an event some endpoint subscribes to: with
none, nothing waits in the outbox for a delivery that would never come.
"""

from __future__ import annotations

from handlers.alerts import AlertNotices, CrisisFacts
from handlers.conflicts import ConflictNotices
from handlers.records import AlertRecord, OutboxRecord

FACTS = CrisisFacts(
    alert_id="al-1",
    user_id="u1",
    device_id="d1",
    site_id=None,
    reasons=["panic"],
    occurred_at_us=1_000_000,
    detected_at_us=2_000_000,
)
RECORD = AlertRecord(
    alert_id="al-2",
    device_id="d1",
    user_id="u/1",
    kind="journal",
    occurred_at_us=1_000_000,
    received_at_us=3_000_000,
)


def channels(rows: list[OutboxRecord]) -> list[tuple[str, str | None, str | None, bool]]:
    return [(r.channel, r.topic, r.event_type, r.urgent) for r in rows]


def test_alert_events_go_to_webhooks_only_when_subscribed() -> None:
    """Checked against: a webhook row written whatever the subscriptions."""
    plain = AlertNotices("fg")
    subscribed = AlertNotices("fg", webhook_events=frozenset({"alert.crisis", "alert.wellness"}))
    assert channels(plain.crisis(FACTS, 0, 5)) == [
        ("mqtt", "fg/alerts/crisis", "alert.crisis", True)
    ]
    assert channels(subscribed.crisis(FACTS, 0, 5)) == [
        ("mqtt", "fg/alerts/crisis", "alert.crisis", True),
        ("webhook", None, "alert.crisis", False),
    ]
    # An escalation is its own event type: not subscribed here, and not leased.
    assert channels(subscribed.crisis(FACTS, 2)) == [
        ("mqtt", "fg/alerts/crisis", "alert.crisis.escalated", False)
    ]
    assert channels(subscribed.wellness(RECORD, "low_mood", "n-1", 4_000_000)) == [
        ("mqtt", "fg/alerts/wellness/u%2F1", "alert.wellness", True),
        ("webhook", None, "alert.wellness", False),
    ]
    assert channels(plain.wellness(RECORD, "low_mood", "n-1", 4_000_000)) == [
        ("mqtt", "fg/alerts/wellness/u%2F1", "alert.wellness", True)
    ]


def test_conflict_events_to_operators_devices_and_subscribed_webhooks() -> None:
    """One row per message body: the operators' topic, copied to each device once.

    Checked against: a row per topic (the body stored once per device), and a device
    named twice copied twice."""
    record = {"conflict_id": "c-1"}
    plain = ConflictNotices("fg")
    rows = plain.event("conflict.detected", record, ["d2", "d1", "d2"])
    assert channels(rows) == [("mqtt", "fg/conflicts", None, False)]
    assert rows[0].also_to == ("fg/devices/d1/conflicts", "fg/devices/d2/conflicts")
    subscribed = ConflictNotices("fg", frozenset({"conflict.resolved"}))
    detected = subscribed.event("conflict.detected", record, [])
    assert channels(detected) == [("mqtt", "fg/conflicts", None, False)]
    assert detected[0].also_to == ()
    resolved = subscribed.event("conflict.resolved", record, ["d1"])
    assert channels(resolved) == [
        ("mqtt", "fg/conflicts", None, False),
        ("webhook", None, "conflict.resolved", False),
    ]
    assert [r.also_to for r in resolved] == [("fg/devices/d1/conflicts",), ()]
    assert resolved[0].payload == resolved[1].payload
