"""The alert schema and the rules that need no history, on `AlertHandler` itself.

Every field gets its edges with the exact error code and path; every rejection
leaves one quarantine record (kind `alert`) holding the raw bytes; no error
message ever echoes a value of the payload.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from handlers.alerts import AlertDecoded, AlertHandler, AlertRules, classify
from handlers.errors import NUL_MESSAGE, Code, Error
from handlers.records import AlertRecord
from tests.support import us

TOPIC = "fg/devices/d1/alerts"
RECEIVED_AT_US = 1_790_000_000_000_000
DROP = object()
RULES = AlertRules()


def make_alert(**mutations: Any) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "alert_id": "al-1",
        "user_id": "u1",
        "kind": "journal",
        "occurred_at": "2026-11-29T12:00:00.123Z",
    }
    for name, value in mutations.items():
        if value is DROP:
            alert.pop(name, None)
        else:
            alert[name] = value
    return alert


def decode(payload: bytes, rules: AlertRules = RULES) -> AlertDecoded:
    decoded = AlertHandler(rules).decode(TOPIC, "d1", payload, RECEIVED_AT_US)
    if decoded.error is None:
        assert decoded.record is not None
        assert decoded.quarantine == []
    else:
        assert decoded.record is None
        (record,) = decoded.quarantine
        assert record.kind == "alert"
        assert record.topic == TOPIC
        assert record.device_id == "d1"
        assert record.received_at_us == RECEIVED_AT_US
        assert record.code == decoded.error.code.value
        assert record.path == decoded.error.path
        assert record.payload == payload[: rules.max_payload_bytes]
        assert record.payload_bytes == len(payload)
    return decoded


STORED = "stored"

FIELD_CASES: list[Any] = [
    pytest.param({}, STORED, id="minimal"),
    pytest.param({"alert_id": "a" * 64}, STORED, id="alert_id-64"),
    pytest.param({"alert_id": "a" * 65}, ("schema", "alert_id", None), id="alert_id-65"),
    pytest.param({"alert_id": ""}, ("schema", "alert_id", None), id="alert_id-empty"),
    pytest.param({"alert_id": DROP}, ("schema", "alert_id", None), id="alert_id-missing"),
    pytest.param({"alert_id": 5}, ("schema", "alert_id", None), id="alert_id-int"),
    pytest.param({"user_id": "u" * 64}, STORED, id="user_id-64"),
    pytest.param({"user_id": "u" * 65}, ("schema", "user_id", "al-1"), id="user_id-65"),
    pytest.param({"user_id": DROP}, ("schema", "user_id", "al-1"), id="user_id-missing"),
    pytest.param({"kind": "panic"}, STORED, id="kind-panic"),
    pytest.param({"kind": "checkin"}, STORED, id="kind-checkin"),
    pytest.param({"kind": "Panic"}, ("schema", "kind", "al-1"), id="kind-case"),
    pytest.param({"kind": DROP}, ("schema", "kind", "al-1"), id="kind-missing"),
    pytest.param({"occurred_at": "2026-11-29T12:00:00+02:00"}, STORED, id="occurred_at-offset"),
    pytest.param(
        {"occurred_at": "2026-11-29T12:00:00"}, ("schema", "occurred_at", "al-1"), id="no-offset"
    ),
    pytest.param({"occurred_at": "yesterday"}, ("schema", "occurred_at", "al-1"), id="not-time"),
    pytest.param({"occurred_at": DROP}, ("schema", "occurred_at", "al-1"), id="time-missing"),
    pytest.param({"mood": 1}, STORED, id="mood-1"),
    pytest.param({"mood": 10}, STORED, id="mood-10"),
    pytest.param({"mood": 4}, STORED, id="mood-4-a-low-mood-journal"),
    pytest.param({"mood": 5}, STORED, id="mood-5-not-low"),
    pytest.param({"mood": 0}, ("schema", "mood", "al-1"), id="mood-0"),
    pytest.param({"mood": 11}, ("schema", "mood", "al-1"), id="mood-11"),
    pytest.param({"mood": 2.5}, ("schema", "mood", "al-1"), id="mood-float"),
    pytest.param({"mood": 2.0}, STORED, id="mood-2.0-is-2"),
    pytest.param({"stress": 5.0}, STORED, id="stress-5.0-is-5"),
    pytest.param({"stress": 4.5}, ("schema", "stress", "al-1"), id="stress-float"),
    pytest.param({"energy": 1e300}, ("schema", "energy", "al-1"), id="energy-huge"),
    pytest.param({"mood": True}, ("schema", "mood", "al-1"), id="mood-bool"),
    pytest.param({"mood": "3"}, ("schema", "mood", "al-1"), id="mood-string"),
    pytest.param({"mood": None}, STORED, id="mood-null"),
    pytest.param({"stress": 1}, STORED, id="stress-1"),
    pytest.param({"stress": 5}, STORED, id="stress-5"),
    pytest.param({"stress": 0}, ("schema", "stress", "al-1"), id="stress-0"),
    pytest.param({"stress": 6}, ("schema", "stress", "al-1"), id="stress-6"),
    pytest.param({"energy": 10}, STORED, id="energy-10"),
    pytest.param({"energy": 11}, ("schema", "energy", "al-1"), id="energy-11"),
    pytest.param({"flags": []}, STORED, id="flags-empty"),
    pytest.param({"flags": ["injury", "x"]}, STORED, id="flags-two"),
    pytest.param({"flags": "injury"}, ("schema", "flags", "al-1"), id="flags-not-list"),
    pytest.param({"flags": [3]}, ("schema", "flags[0]", "al-1"), id="flags-not-str"),
    pytest.param({"flags": ["f"] * 33 + [""]}, STORED, id="flags-any-strings"),
    pytest.param({"site_id": "s1"}, STORED, id="site_id"),
    pytest.param({"site_id": ""}, STORED, id="site_id-empty"),
    pytest.param({"site_id": "s" * 129}, ("schema", "site_id", "al-1"), id="site_id-129"),
    pytest.param({"site_id": 3}, ("schema", "site_id", "al-1"), id="site_id-int"),
    pytest.param({"note": "n" * 8192}, STORED, id="note-8KiB"),
    pytest.param({"note": "n" * 8193}, ("schema", "note", "al-1"), id="note-over-8KiB"),
    pytest.param({"note": "é" * 4097}, ("schema", "note", "al-1"), id="note-8KiB-in-bytes"),
    pytest.param({"note": 7}, ("schema", "note", "al-1"), id="note-int"),
    pytest.param({"device_id": "d1"}, STORED, id="device_id-same"),
    pytest.param({"device_id": "d2"}, ("device_mismatch", "device_id", "al-1"), id="mismatch"),
    pytest.param({"device_id": "d 1"}, ("schema", "device_id", "al-1"), id="device_id-bad"),
    pytest.param({"extra_field": 1}, STORED, id="unknown-field-ignored"),
]


def expected_record(alert: dict[str, Any], payload: bytes) -> AlertRecord:
    """The record an accepted alert must become, worked out from the alert itself (its
    classification by `classify`, which test_classification pins case by case)."""

    def scale(name: str) -> int | None:
        value = alert.get(name)
        return None if value is None else int(value)

    mood, stress = scale("mood"), scale("stress")
    flags = alert.get("flags") or []
    classification, reasons = classify(RULES, alert["kind"], mood, stress, flags)
    return AlertRecord(
        alert_id=alert["alert_id"],
        device_id="d1",
        user_id=alert["user_id"],
        kind=alert["kind"],
        occurred_at_us=us(alert["occurred_at"]),
        received_at_us=RECEIVED_AT_US,
        mood=mood,
        stress=stress,
        energy=scale("energy"),
        flags=flags,
        site_id=alert.get("site_id"),
        note=alert.get("note"),
        payload=payload,
        base_classification=classification,
        base_reasons=reasons,
        low_mood_journal=alert["kind"] == "journal" and mood is not None and mood <= 4,
    )


ALERT_MESSAGES: dict[str, str] = {
    "alert_id-65": "Expected `str` of length <= 64",
    "alert_id-empty": "Expected `str` of length >= 1",
    "alert_id-missing": "Object missing required field `alert_id`",
    "alert_id-int": "Expected `str`, got `int`",
    "user_id-65": "Expected `str` of length <= 64",
    "user_id-missing": "Object missing required field `user_id`",
    "kind-case": "Invalid enum value",
    "kind-missing": "Object missing required field `kind`",
    "no-offset": "Expected `datetime` with a timezone component",
    "not-time": "Invalid RFC3339 encoded datetime",
    "time-missing": "Object missing required field `occurred_at`",
    "mood-0": "Expected `float` >= 1.0",
    "mood-11": "Expected `float` <= 10.0",
    "mood-float": "Expected `int`",
    "stress-float": "Expected `int`",
    "energy-huge": "Expected `float` <= 10.0",
    "mood-bool": "Expected `float | null`, got `bool`",
    "mood-string": "Expected `float | null`, got `str`",
    "stress-0": "Expected `float` >= 1.0",
    "stress-6": "Expected `float` <= 5.0",
    "energy-11": "Expected `float` <= 10.0",
    "flags-not-list": "Expected `array | null`, got `str`",
    "flags-not-str": "Expected `str`, got `int`",
    "site_id-129": "Expected `str` of length <= 128",
    "site_id-int": "Expected `str | null`, got `int`",
    "note-over-8KiB": "note is over 8192 bytes",
    "note-8KiB-in-bytes": "note is over 8192 bytes",
    "note-int": "Expected `str | null`, got `int`",
    "mismatch": "device_id is not the topic's device",
    "device_id-bad": "Expected `str` matching regex '^[A-Za-z0-9_.-]{1,64}$'",
}
"""The message of each rejected case of FIELD_CASES, by its id."""


@pytest.mark.parametrize(("mutations", "expected"), FIELD_CASES)
def test_field(mutations: dict[str, Any], expected: Any, request: pytest.FixtureRequest) -> None:
    alert = make_alert(**mutations)
    payload = json.dumps(alert).encode()
    decoded = decode(payload)
    if expected == STORED:
        assert decoded.error is None, decoded.error
        assert decoded.record == expected_record(alert, payload)
        assert decoded.alert_id == alert["alert_id"]
        return
    code, path, alert_id = expected
    message = ALERT_MESSAGES[request.node.callspec.id]
    assert (decoded.alert_id, decoded.error) == (alert_id, Error(Code(code), message, path))


def test_record_keeps_every_field_and_the_whole_payload() -> None:
    alert = make_alert(
        mood=3, stress=2, energy=7, flags=["x"], site_id="s9", note="mine", device_id="d1"
    )
    payload = json.dumps(alert).encode()
    decoded = decode(payload)
    assert decoded.record == AlertRecord(
        alert_id="al-1",
        device_id="d1",
        user_id="u1",
        kind="journal",
        occurred_at_us=1_795_953_600_123_000,
        received_at_us=RECEIVED_AT_US,
        mood=3,
        stress=2,
        energy=7,
        flags=["x"],
        site_id="s9",
        note="mine",
        payload=payload,
        base_classification="wellness",
        base_reasons=["low_mood"],
        low_mood_journal=True,
        status="pending",
        classification=None,
        reasons=[],
        notified=None,
    )


MINIMAL = json.dumps(make_alert()).encode()
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"not json", "malformed", "not valid JSON: JSON is malformed: invalid character (byte 4)"),
        (b"[1, 2]", "malformed", "the payload is not a JSON object"),
        (b'"text"', "malformed", "the payload is not a JSON object"),
        (b'{"alert_id": "\xff"}', "malformed", "the payload is not UTF-8"),
        (b"", "malformed", "not valid JSON: Input data was truncated"),
        (
            b"{" + b'"a": [' * 5000 + b"]" * 5000 + b"}",
            "malformed",
            "not valid JSON: JSON is malformed: expected ',' or ']' (byte 10)",
        ),
        (
            MINIMAL[:-1] + b', "extra": ' + DEEP + b"}",
            "malformed",
            "the payload is nested too deeply",
        ),
        (
            b'{"alert_id": "x", "note": "' + b"n" * (256 * 1024) + b'"}',
            "too_large",
            "payload is 262173 bytes, over the limit of 262144",
        ),
    ],
    ids=["not-json", "array", "string", "not-utf8", "empty", "broken", "deep", "too-large"],
)
def test_whole_payload_errors(payload: bytes, code: str, message: str) -> None:
    decoded = decode(payload)
    assert (decoded.alert_id, decoded.error) == (None, Error(Code(code), message))


def test_errors_never_echo_a_value_of_the_payload() -> None:
    marker = "MARKER-7d1f"
    for mutations in (
        {"kind": marker},
        {"mood": marker},
        {"occurred_at": marker},
        {"flags": [marker, 3]},
        {"device_id": marker},
        {"note": marker * 2000},
        {"user_id": marker * 10},
    ):
        decoded = decode(json.dumps(make_alert(**mutations)).encode())
        assert decoded.error is not None, mutations
        assert marker not in json.dumps(decoded.error.as_dict()), decoded.error


# -- classification without history ---------------------------------------------

CLASSIFY_CASES: list[Any] = [
    # (kind, mood, stress, flags) -> (classification, reasons)
    pytest.param("panic", None, None, [], ("crisis", ["panic"]), id="panic"),
    pytest.param("journal", 2, 5, [], ("crisis", ["low_mood_high_stress"]), id="mood2-stress5"),
    pytest.param("journal", 1, 5, [], ("crisis", ["low_mood_high_stress"]), id="mood1-stress5"),
    pytest.param("journal", 3, 5, [], ("wellness", ["low_mood", "high_stress"]), id="mood3-s5"),
    pytest.param("journal", 2, 4, [], ("wellness", ["low_mood", "high_stress"]), id="mood2-s4"),
    pytest.param("journal", 2, None, [], ("wellness", ["low_mood"]), id="mood2-no-stress"),
    pytest.param("journal", None, 5, [], ("wellness", ["high_stress"]), id="stress5-no-mood"),
    pytest.param("journal", 4, None, [], ("wellness", ["low_mood"]), id="mood4"),
    pytest.param("journal", 5, None, [], ("none", []), id="mood5"),
    pytest.param("checkin", 7, 4, [], ("wellness", ["high_stress"]), id="stress4"),
    pytest.param("checkin", 7, 3, [], ("none", []), id="stress3"),
    pytest.param("checkin", None, None, [], ("none", []), id="nothing"),
    pytest.param("journal", 8, 1, ["self_harm_risk"], ("crisis", ["self_harm_risk"]), id="f1"),
    pytest.param(
        "journal", 8, 1, ["suicidal_ideation"], ("crisis", ["suicidal_ideation"]), id="f2"
    ),
    pytest.param("checkin", None, None, ["violence"], ("crisis", ["violence"]), id="f3"),
    pytest.param("checkin", None, None, ["injury"], ("crisis", ["injury"]), id="f4"),
    pytest.param("checkin", None, None, ["tired", "Injury"], ("none", []), id="other-flags"),
    pytest.param(
        "panic",
        1,
        5,
        ["injury", "violence", "tired"],
        ("crisis", ["panic", "violence", "injury", "low_mood_high_stress"]),
        id="every-crisis-rule",
    ),
]


@pytest.mark.parametrize(("kind", "mood", "stress", "flags", "expected"), CLASSIFY_CASES)
def test_classification(
    kind: str, mood: int | None, stress: int | None, flags: list[str], expected: Any
) -> None:
    assert classify(RULES, kind, mood, stress, flags) == expected
    fields: dict[str, Any] = {"kind": kind, "flags": flags}
    if mood is not None:
        fields["mood"] = mood
    if stress is not None:
        fields["stress"] = stress
    record = decode(json.dumps(make_alert(**fields)).encode()).record
    assert record is not None
    assert (record.base_classification, record.base_reasons) == expected


def test_integral_floats_are_integers() -> None:
    record = decode(json.dumps(make_alert(mood=2.0, stress=5.0, energy=7.0)).encode()).record
    assert record is not None
    assert (record.mood, record.stress, record.energy) == (2, 5, 7)
    assert all(type(v) is int for v in (record.mood, record.stress, record.energy))
    assert record.base_classification == "crisis"


def test_rules_come_from_the_config() -> None:
    rules = AlertRules(
        crisis_kinds=frozenset(),
        crisis_flags=("fall",),
        crisis_mood_max=3,
        crisis_stress_min=4,
        wellness_mood_max=5,
        wellness_stress_min=3,
    )
    assert classify(rules, "panic", None, None, []) == ("none", [])
    assert classify(rules, "checkin", None, None, ["fall"]) == ("crisis", ["fall"])
    assert classify(rules, "checkin", None, None, ["injury"]) == ("none", [])
    assert classify(rules, "journal", 3, 4, []) == ("crisis", ["low_mood_high_stress"])
    assert classify(rules, "journal", 5, 3, []) == ("wellness", ["low_mood", "high_stress"])


def test_crisis_ack_payload() -> None:
    handler = AlertHandler(RULES)
    ok = handler.decode_ack("fg/alerts/crisis/ack", b'{"alert_id": "a1", "by": "ops"}', 5)
    assert ok.record is not None and ok.error is None
    assert (ok.record.alert_id, ok.record.by, ok.record.received_at_us) == ("a1", "ops", 5)
    bad = handler.decode_ack("fg/alerts/crisis/ack", b'{"alert_id": "a1"}', 5)
    assert bad.record is None and bad.error is not None
    assert (bad.error.code.value, bad.error.path) == ("schema", "by")
    (quarantined,) = bad.quarantine
    assert quarantined.kind == "crisis_ack"


# -- the history rule's window (storage/alerts.py: `sustained`) -----------------

DAY = 86_400_000_000
WEEK = 7 * DAY


@pytest.mark.parametrize(
    ("stored", "at", "expected"),
    [
        ([], 0, False),
        ([-1 * DAY], 0, False),  # the second entry
        ([-2 * DAY, -1 * DAY], 0, True),  # the third, in order
        ([-3 * DAY, -2 * DAY, -1 * DAY], 0, True),  # the fourth still holds
        ([-WEEK, -1 * DAY], 0, False),  # exactly 7 days before: outside (x - 7 days, x]
        ([-WEEK + 1, -1 * DAY], 0, True),  # a microsecond inside
        ([1 * DAY, 2 * DAY], 0, True),  # the oldest arrives last: it completes the pattern
        ([-2 * DAY, 4 * DAY], 0, True),  # one before, one after, within one window
        ([-3 * DAY, 4 * DAY], 0, False),  # 7 days apart: not within one window
        ([-4 * DAY, 4 * DAY], 0, False),  # 8 days apart: no window holds all three
        ([-6 * DAY, 6 * DAY], 0, False),
        ([0, 0], 0, True),  # the same moment
    ],
)
def test_sustained_low_mood_window(stored: list[int], at: int, expected: bool) -> None:
    from storage.alerts import sustained

    assert sustained([at, *stored], at, WEEK, 3) is expected


# -- the edges of the rules, one by one ----------------------------------------------


def test_a_payload_of_exactly_the_limit_is_read() -> None:
    alert = make_alert(note="")
    alert["note"] = "n" * (2048 - len(json.dumps(alert)))
    payload = json.dumps(alert).encode()
    assert len(payload) == 2048
    rules = AlertRules(max_payload_bytes=2048, max_note_bytes=2048)
    decoded = decode(payload, rules)
    assert decoded.error is None
    over = decode(payload + b" ", rules)
    assert over.error == Error(Code.TOO_LARGE, "payload is 2049 bytes, over the limit of 2048")


@pytest.mark.parametrize("name", ["alert_id", "user_id", "site_id"])
def test_a_nul_in_a_text_column_is_rejected(name: str) -> None:
    alert = make_alert(site_id="s1", note="n")
    alert[name] = "x\x00"
    decoded = decode(json.dumps(alert).encode())
    assert (decoded.alert_id, decoded.error) == (
        alert["alert_id"],
        Error(Code.SCHEMA, NUL_MESSAGE, name),
    )


def test_a_nul_in_the_note_is_stored_as_u_fffd_and_the_panic_classified() -> None:
    """A panic must not be lost to a detail of its text: PostgreSQL cannot hold a NUL
    in text, so each becomes U+FFFD (docs/alerts.md). Checked against: the note
    refused (`schema` at `note`), as it was; the NUL dropped instead of replaced."""
    alert = make_alert(kind="panic", note="\x00help\x00\x00me\x00")
    payload = json.dumps(alert).encode()
    decoded = decode(payload)
    expected = expected_record({**alert, "note": "\ufffdhelp\ufffd\ufffdme\ufffd"}, payload)
    assert decoded.record == expected
    assert (expected.base_classification, expected.base_reasons) == ("crisis", ["panic"])


def test_the_note_s_limit_counts_a_nul_as_sent() -> None:
    """8 KiB of the note as sent (a NUL is one byte), though stored as three."""
    rules = AlertRules(max_note_bytes=8)
    stored = decode(json.dumps(make_alert(note="\x00" * 8)).encode(), rules).record
    assert stored is not None and stored.note == "\ufffd" * 8
    over = decode(json.dumps(make_alert(note="\x00" * 9)).encode(), rules)
    assert over.error == Error(Code.SCHEMA, "note is over 8 bytes", "note")


@pytest.mark.parametrize(
    ("occurred_at", "stored"),
    [
        ("0001-01-01T01:00:00+01:00", True),  # 0001-01-01T00:00:00Z, the first instant
        ("0001-01-01T00:59:59.999999+01:00", False),  # year 0 in UTC
        ("9999-12-31T18:59:59.999999-05:00", True),  # 9999-12-31T23:59:59.999999Z
        ("9999-12-31T19:00:00-05:00", False),  # year 10000 in UTC
    ],
)
def test_occurred_at_within_what_rfc_3339_writes(occurred_at: str, stored: bool) -> None:
    """A crisis outside these instants could not be written into its message: writing
    it raised OverflowError in the writer, and the panic was refused as poison (found
    by fuzzing)."""
    alert = make_alert(kind="panic", occurred_at=occurred_at)
    payload = json.dumps(alert).encode()
    decoded = decode(payload)
    if stored:
        assert decoded.record == expected_record(alert, payload)
        return
    message = "Expected a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
    assert (decoded.alert_id, decoded.error) == ("al-1", Error(Code.SCHEMA, message, "occurred_at"))


def test_a_nul_in_the_flags_is_kept_as_sent() -> None:
    alert = make_alert(flags=["x\x00"])
    payload = json.dumps(alert).encode()
    assert decode(payload).record == expected_record(alert, payload)


def test_an_alert_id_that_can_be_read_is_reported_at_any_length_it_may_have() -> None:
    for alert_id in ("a", "a" * 64):
        decoded = decode(json.dumps(make_alert(alert_id=alert_id, mood=0)).encode())
        assert (decoded.alert_id, decoded.error is not None) == (alert_id, True)
