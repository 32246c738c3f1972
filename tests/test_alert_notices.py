"""What alerts cause, on `handlers.alerts` itself: the crisis and wellness messages
(ids, reasons and times, never a note), crisis acknowledgements, and an alert the
database refused alone."""

from __future__ import annotations

import json

import pytest

from handlers.alerts import (
    AlertHandler,
    AlertNotices,
    AlertRules,
    CrisisFacts,
    notification_id,
    topic_level,
)
from handlers.errors import NUL_MESSAGE
from handlers.records import AlertRecord, CrisisAckRecord, OutboxRecord, QuarantineRecord

T = 1_795_953_600_000_000
"""2026-11-29T12:00:00Z"""
ACK_TOPIC = "fg/alerts/crisis/ack"

FACTS = CrisisFacts(
    alert_id="a1",
    user_id="ann",
    device_id="d1",
    site_id="s9",
    reasons=["panic", "injury"],
    occurred_at_us=T,
    detected_at_us=T + 250_000,
)
CRISIS_BODY = {
    "alert_id": "a1",
    "user_id": "ann",
    "device_id": "d1",
    "site_id": "s9",
    "reasons": ["panic", "injury"],
    "occurred_at": "2026-11-29T12:00:00Z",
    "detected_at": "2026-11-29T12:00:00.250Z",
}


def test_a_crisis_is_published_at_once_and_is_a_webhook_event() -> None:
    message, event = AlertNotices(
        root="fg",
        webhook_events=frozenset({"alert.crisis", "alert.crisis.escalated", "alert.wellness"}),
    ).crisis(FACTS, 0, origin_at_us=T + 5)
    body = {**CRISIS_BODY, "escalation": 0}
    assert (message.channel, message.topic, message.event_type) == (
        "mqtt",
        "fg/alerts/crisis",
        "alert.crisis",
    )
    assert json.loads(message.payload) == body
    assert (message.qos, message.retain, message.urgent, message.origin_at_us) == (
        1,
        False,
        True,
        T + 5,
    )
    assert event == OutboxRecord(
        channel="webhook", event_type="alert.crisis", payload=message.payload, origin_at_us=T + 5
    )


def test_an_escalation_is_published_by_the_outbox_and_says_its_level() -> None:
    message, event = AlertNotices(
        root="fg",
        webhook_events=frozenset({"alert.crisis", "alert.crisis.escalated", "alert.wellness"}),
    ).crisis(FACTS, 2)
    assert json.loads(message.payload) == {**CRISIS_BODY, "escalation": 2}
    assert (message.topic, message.event_type, message.urgent, message.origin_at_us) == (
        "fg/alerts/crisis",
        "alert.crisis.escalated",
        False,
        None,
    )
    assert (event.channel, event.event_type, event.payload) == (
        "webhook",
        "alert.crisis.escalated",
        message.payload,
    )


def record(**fields: object) -> AlertRecord:
    base: dict[str, object] = {
        "alert_id": "a1",
        "device_id": "d1",
        "user_id": "ann/x",
        "kind": "journal",
        "occurred_at_us": T,
        "received_at_us": T + 7,
        "mood": 2,
        "note": "private words",
    }
    return AlertRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_a_wellness_notification_names_the_user_in_its_topic_and_carries_no_note() -> None:
    notices = AlertNotices(
        root="fg",
        suggestions={"low_mood": "Take a break."},
        webhook_events=frozenset({"alert.crisis", "alert.crisis.escalated", "alert.wellness"}),
    )
    message, event = notices.wellness(record(), "low_mood", "n-1", T + 1000)
    assert (message.channel, message.topic, message.event_type, message.urgent) == (
        "mqtt",
        "fg/alerts/wellness/ann%2Fx",
        "alert.wellness",
        True,
    )
    assert json.loads(message.payload) == {
        "notification_id": "n-1",
        "user_id": "ann/x",
        "reason": "low_mood",
        "suggestion": "Take a break.",
        "created_at": "2026-11-29T12:00:00.001Z",
    }
    assert message.origin_at_us == T + 7
    assert event == OutboxRecord(
        channel="webhook",
        event_type="alert.wellness",
        payload=message.payload,
        origin_at_us=T + 7,
    )
    assert b"private" not in message.payload


def test_a_reason_without_a_suggestion_gets_an_empty_one() -> None:
    (message,) = AlertNotices().wellness(record(), "high_stress", "n-2", T)
    assert message.topic == "fieldgate/alerts/wellness/ann%2Fx"
    assert json.loads(message.payload)["suggestion"] == ""


@pytest.mark.parametrize(
    ("user_id", "level"),
    [
        ("ann", "ann"),
        ("a/b", "a%2Fb"),
        ("x+#y", "x%2B%23y"),
        ("50%", "50%25"),
        ("n\x00l", "n%00l"),
        ("é ok", "é ok"),
        ("X/Y", "X%2FY"),
    ],
)
def test_a_user_id_as_one_topic_level(user_id: str, level: str) -> None:
    assert topic_level(user_id) == level


def test_a_notification_id_is_the_same_for_the_same_alert_and_reason() -> None:
    """A retried transaction writes the same notification (and a release the same ids)."""
    assert notification_id("a1", "low_mood") == "1a12a6fd-c5b1-5128-8733-3f93b7103227"
    assert notification_id("a1", "low_mood") == notification_id("a1", "low_mood")
    assert notification_id("a1", "high_stress") != notification_id("a1", "low_mood")
    assert notification_id("a2", "low_mood") != notification_id("a1", "low_mood")


# -- crisis acknowledgements ------------------------------------------------------------


def test_a_crisis_ack_is_a_record() -> None:
    decoded = AlertHandler(AlertRules()).decode_ack(ACK_TOPIC, b'{"alert_id": "a1", "by": "o"}', 7)
    assert (decoded.record, decoded.error, decoded.quarantine) == (
        CrisisAckRecord(alert_id="a1", by="o", received_at_us=7),
        None,
        [],
    )
    assert decoded.records == [decoded.record]
    assert decoded.rejections() == []


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"x" * (256 * 1024 + 1), {"code": "too_large", "message": "payload is over 262144 bytes"}),
        (
            b"{nope",
            {
                "code": "malformed",
                "message": (
                    "not valid JSON: JSON is malformed: object keys must be strings (byte 1)"
                ),
            },
        ),
        (
            b'{"alert_id": "a1"}',
            {
                "code": "schema",
                "message": "Object missing required field `by`",
                "path": "by",
            },
        ),
        (
            b'{"alert_id": 5, "by": "x"}',
            {
                "code": "schema",
                "message": "Expected `str`, got `int`",
                "path": "alert_id",
            },
        ),
        (
            b'{"alert_id": "a\\u0000", "by": "x"}',
            {
                "code": "schema",
                "message": NUL_MESSAGE,
                "path": "alert_id",
            },
        ),
        (
            b'{"alert_id": "a1", "by": "o\\u0000"}',
            {
                "code": "schema",
                "message": NUL_MESSAGE,
                "path": "by",
            },
        ),
        (
            b'{"alert_id": "a1", "by": "o", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            {"code": "malformed", "message": "the payload is nested too deeply"},
        ),
        (
            b'{"alert_id": "a1", "by": "' + b"b" * 129 + b'"}',
            {
                "code": "schema",
                "message": "Expected `str` of length <= 128",
                "path": "by",
            },
        ),
    ],
    ids=["too-large", "malformed", "missing", "type", "nul-id", "nul-by", "deep", "by-129"],
)
def test_a_bad_crisis_ack_is_rejected_and_quarantined(
    payload: bytes, error: dict[str, str]
) -> None:
    decoded = AlertHandler(AlertRules()).decode_ack(ACK_TOPIC, payload, 7)
    assert decoded.record is None
    assert decoded.error is not None and decoded.error.as_dict() == error
    assert decoded.records == []
    assert decoded.rejections() == [(None, decoded.error)]
    assert decoded.quarantine == [
        QuarantineRecord(
            received_at_us=7,
            topic=ACK_TOPIC,
            device_id=None,
            kind="crisis_ack",
            code=error["code"],
            message=error["message"],
            path=error.get("path"),
            payload=payload[: 256 * 1024],
            payload_bytes=len(payload),
        )
    ]


def test_a_crisis_ack_the_database_refused() -> None:
    decoded = AlertHandler(AlertRules()).decode_ack(ACK_TOPIC, b'{"alert_id": "a1", "by": "o"}', 7)
    alert_id, error = decoded.refuse(decoded.record, "CheckViolation")
    assert (alert_id, error.as_dict()) == (
        "a1",
        {
            "code": "schema",
            "message": "the database refused this acknowledgement (CheckViolation)",
        },
    )
    assert (decoded.record, decoded.error, decoded.rejections()) == (None, error, [(None, error)])


def test_an_alert_the_database_refused() -> None:
    payload = (
        b'{"alert_id": "a1", "user_id": "u", "kind": "panic",'
        b' "occurred_at": "2026-11-29T12:00:00Z"}'
    )
    decoded = AlertHandler(AlertRules()).decode("fg/devices/d1/alerts", "d1", payload, 7)
    assert decoded.rejections() == []
    alert_id, error = decoded.refuse(decoded.record, "IntegrityError")
    assert (alert_id, error.as_dict()) == (
        "a1",
        {"code": "schema", "message": "the database refused this alert (IntegrityError)"},
    )
    assert (decoded.record, decoded.records, decoded.rejections()) == (None, [], [("a1", error)])


def test_a_crisis_ack_of_exactly_the_limit_is_read() -> None:
    payload = b'{"alert_id": "a1", "by": "o"}'.ljust(1024)
    decoded = AlertHandler(AlertRules(max_payload_bytes=1024)).decode_ack(ACK_TOPIC, payload, 7)
    assert decoded.record == CrisisAckRecord(alert_id="a1", by="o", received_at_us=7)
    over = AlertHandler(AlertRules(max_payload_bytes=1023)).decode_ack(ACK_TOPIC, payload, 7)
    assert over.error is not None and over.error.code.value == "too_large"


def test_no_webhook_event_without_a_subscriber() -> None:
    """An event no endpoint subscribes to is not written: nothing would ever send it."""
    notices = AlertNotices(root="fg", webhook_events=frozenset({"alert.wellness"}))
    (crisis,) = notices.crisis(FACTS, 0)
    assert crisis.channel == "mqtt"
    message, event = notices.wellness(record(), "low_mood", "n-3", T)
    assert (message.channel, event.channel, event.event_type) == (
        "mqtt",
        "webhook",
        "alert.wellness",
    )
