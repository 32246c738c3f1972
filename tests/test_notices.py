"""The messages alerts and conflicts cause, as outbox records: the handlers alone, and
the subscriptions the config's `[[webhooks]]` give them (gateway/ingest/rules.py).

A webhook row is written only for an event some enabled endpoint subscribes to: with
none, nothing waits in the outbox for a delivery that would never come.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from gateway.config import ENV_PREFIX, Settings
from gateway.ingest import rules
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


def settings_of(
    monkeypatch: pytest.MonkeyPatch, webhooks: list[dict[str, Any]] | None = None
) -> Settings:
    """Settings of these endpoints and the defaults, whatever the shell's environment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return Settings.model_validate({"webhooks": webhooks or []})


def endpoint(name: str, events: list[str], enabled: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "url": f"https://{name}.example/in",
        "events": events,
        "secret": "whsec_c2VjcmV0LWtleQ==",
        "enabled": enabled,
    }


def test_webhook_events_are_the_union_of_the_enabled_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the engine's notices are built with, at start and on every reload
    (gateway/ingest/rules.py).

    Checked against: only the first endpoint's events, a disabled endpoint's events
    written (nothing would send them), and `*` kept as a literal event name."""
    assert rules.webhook_events(settings_of(monkeypatch)) == frozenset()
    settings = settings_of(
        monkeypatch,
        [
            endpoint("a", ["alert.crisis"]),
            endpoint("b", ["conflict.detected", "alert.crisis"]),
            endpoint("c", ["alert.wellness"], enabled=False),
        ],
    )
    assert rules.webhook_events(settings) == frozenset({"alert.crisis", "conflict.detected"})
    everything = settings_of(monkeypatch, [endpoint("a", ["alert.crisis"]), endpoint("all", ["*"])])
    assert rules.webhook_events(everything) == frozenset(
        {
            "conflict.detected",
            "conflict.updated",
            "conflict.resolved",
            "alert.crisis",
            "alert.crisis.escalated",
            "alert.wellness",
            "model.trained",
        }
    )
    off = settings_of(monkeypatch, [endpoint("all", ["*"], enabled=False)])
    assert rules.webhook_events(off) == frozenset()


def test_the_notices_write_the_subscribed_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the settings to the rows: the alert and conflict notices carry the union.

    Checked against: notices built with their default (no events) whatever the
    config, on either side."""
    settings = settings_of(
        monkeypatch, [endpoint("a", ["alert.crisis"]), endpoint("b", ["conflict.resolved"])]
    )
    alerts = rules.alert_notices(settings)
    assert channels(alerts.crisis(FACTS, 0, 5)) == [
        ("mqtt", "fieldgate/alerts/crisis", "alert.crisis", True),
        ("webhook", None, "alert.crisis", False),
    ]
    assert channels(alerts.wellness(RECORD, "low_mood", "n-1", 4_000_000)) == [
        ("mqtt", "fieldgate/alerts/wellness/u%2F1", "alert.wellness", True)
    ]
    conflicts = rules.conflict_notices(settings)
    assert channels(conflicts.event("conflict.resolved", {"conflict_id": "c-1"}, [])) == [
        ("mqtt", "fieldgate/conflicts", None, False),
        ("webhook", None, "conflict.resolved", False),
    ]
    assert channels(conflicts.event("conflict.detected", {"conflict_id": "c-1"}, [])) == [
        ("mqtt", "fieldgate/conflicts", None, False)
    ]
