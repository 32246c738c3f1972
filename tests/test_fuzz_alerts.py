"""Fuzzing `AlertHandler.decode` and `decode_ack`: valid alerts and crisis acks, and
near-valid ones.

A valid alert (PROTOCOL.md, Alerts) is accepted, classified by the rules without
history (computed here apart from `classify`), and its record holds what was sent:
`occurred_at` to the microsecond, the scales as integers, the raw payload, and the
note with each NUL replaced by U+FFFD (docs/alerts.md). A near-valid one gets the
code and path predicted for it, and the alert_id it must be answered with. Any
bytes at all get a typed answer; nothing may raise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import example, given
from hypothesis import strategies as st

from handlers.alerts import AckDecoded, AlertDecoded, AlertHandler, AlertRules
from handlers.errors import NUL_MESSAGE, Code, Error
from handlers.times import OUT_OF_RANGE
from tests.support.fuzz import (
    BAD_TOKENS,
    DAY_US,
    LONE_SURROGATES,
    MAX_US,
    MIN_US,
    NOT_UTF8,
    Obj,
    Time,
    Token,
    dumps,
    fuzz_settings,
    ids,
    nested,
    not_times,
    not_utf8_string,
    of_other_type,
    stretch,
    texts,
    times,
    times_out_of_range,
    with_nul,
)

DEVICE = "tab-04"
TOPIC = f"fg/devices/{DEVICE}/alerts"
ACK_TOPIC = "fg/alerts/crisis/ack"
RECEIVED_AT_US = 1_790_000_000_000_000
RULES = AlertRules()
HANDLER = AlertHandler(RULES)
CRISIS_FLAGS = ["self_harm_risk", "suicidal_ideation", "violence", "injury"]
REQUIRED = ("alert_id", "user_id", "kind", "occurred_at")
SCALES = {"mood": 10, "stress": 5, "energy": 10}
TYPES = {
    "alert_id": ("str",),
    "user_id": ("str",),
    "kind": ("str",),
    "occurred_at": ("str",),
    "mood": ("int", "float", "null"),
    "stress": ("int", "float", "null"),
    "energy": ("int", "float", "null"),
    "flags": ("list", "null"),
    "site_id": ("str", "null"),
    "note": ("str", "null"),
    "device_id": ("str",),
}
KNOWN = frozenset(TYPES)


def expected_classification(
    kind: str, mood: Any, stress: Any, flags: list[str]
) -> tuple[str, list[str]]:
    """PROTOCOL.md's rules with the default settings, apart from `handlers.alerts`."""
    crisis = (["panic"] if kind == "panic" else []) + [f for f in CRISIS_FLAGS if f in flags]
    if mood is not None and stress is not None and mood <= 2 and stress >= 5:
        crisis.append("low_mood_high_stress")
    if crisis:
        return "crisis", crisis
    wellness = (["low_mood"] if mood is not None and mood <= 4 else []) + (
        ["high_stress"] if stress is not None and stress >= 4 else []
    )
    return ("wellness", wellness) if wellness else ("none", [])


@dataclass(frozen=True)
class Alert:
    """A valid alert as sent, and its record's fields but `payload`."""

    body: Obj
    fields: dict[str, Any]


@st.composite
def scale(draw: st.DrawFn, top: int) -> tuple[Any, int]:
    """A scale value as a device's JSON library may write it (`3` or `3.0`), and its int."""
    value = draw(st.integers(1, top))
    return (float(value) if draw(st.booleans()) else value), value


NOTES = (
    texts(max_size=40)
    | with_nul(texts(max_size=40))
    | st.builds(
        lambda text, size: (text * size).encode()[:size].decode("utf-8", "ignore"),
        texts(1, 3),
        st.integers(7_000, 8_192),
    )
)
"""Notes as people write them, with NULs among them, and up to the 8 KiB limit."""


@st.composite
def valid_alerts(draw: st.DrawFn) -> Alert:
    kind = draw(st.sampled_from(["journal", "panic", "checkin"]))
    occurred_at: Time = draw(times(MIN_US + DAY_US, MAX_US - DAY_US))
    sent: dict[str, Any] = {
        "alert_id": draw(ids(64)),
        "user_id": draw(ids(64)),
        "kind": kind,
        "occurred_at": occurred_at.text,
    }
    ints: dict[str, int | None] = dict.fromkeys(SCALES)
    for name, top in SCALES.items():
        if draw(st.booleans()):
            sent[name], ints[name] = draw(scale(top))
        elif draw(st.booleans()):
            sent[name] = None
    optional: dict[str, st.SearchStrategy[Any]] = {
        "flags": st.none()
        | st.lists(st.sampled_from(CRISIS_FLAGS) | texts(max_size=12), max_size=4),
        "site_id": st.none() | st.just("") | ids(128),
        "note": st.none() | NOTES,
        "device_id": st.just(DEVICE),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            sent[name] = draw(strategy)
    order = sorted(sent)
    random.Random(draw(st.integers(0, 2**16))).shuffle(order)
    flags = sent.get("flags") or []
    mood, stress = ints["mood"], ints["stress"]
    classification, reasons = expected_classification(kind, mood, stress, flags)
    note = sent.get("note")
    fields = {
        "alert_id": sent["alert_id"],
        "device_id": DEVICE,
        "user_id": sent["user_id"],
        "kind": kind,
        "occurred_at_us": occurred_at.us,
        "received_at_us": RECEIVED_AT_US,
        "mood": mood,
        "stress": stress,
        "energy": ints["energy"],
        "flags": flags,
        "site_id": sent.get("site_id"),
        "note": None if note is None else note.replace("\x00", "\ufffd"),
        "base_classification": classification,
        "base_reasons": reasons,
        "low_mood_journal": kind == "journal" and mood is not None and mood <= 4,
        "status": "pending",
        "classification": None,
        "reasons": [],
        "notified": None,
    }
    return Alert(Obj(tuple((name, sent[name]) for name in order)), fields)


# -- what must come out ---------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    fields: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """Rejected: `code` at `path`; answered with the alert_id when it can be read
    (`whole`: never, the payload is refused as a whole or is not JSON)."""

    code: Code
    path: str | None = None
    message: str | None = None
    whole: bool = False


Outcome = Stored | Refused


def lenient_alert_id(body: Any) -> str | None:
    value = body.get("alert_id") if isinstance(body, Obj) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def check_alert(payload: bytes, body: Any, outcome: Outcome) -> AlertDecoded:
    decoded = HANDLER.decode(TOPIC, DEVICE, payload, RECEIVED_AT_US)
    if isinstance(outcome, Stored):
        assert decoded.error is None, decoded.error
        assert decoded.quarantine == []
        assert decoded.record is not None
        fields = msgspec.structs.asdict(decoded.record)
        assert fields.pop("payload") == payload
        assert fields == outcome.fields
        assert decoded.alert_id == outcome.fields["alert_id"]
        return decoded
    assert decoded.record is None
    assert decoded.error is not None
    assert (decoded.error.code, decoded.error.path) == (outcome.code, outcome.path), decoded.error
    if outcome.message is not None:
        assert decoded.error.message == outcome.message
    assert decoded.alert_id == (None if outcome.whole else lenient_alert_id(body))
    (row,) = decoded.quarantine
    assert (row.topic, row.device_id, row.kind, row.received_at_us) == (
        TOPIC,
        DEVICE,
        "alert",
        RECEIVED_AT_US,
    )
    assert (row.code, row.message, row.path) == (
        decoded.error.code.value,
        decoded.error.message,
        decoded.error.path,
    )
    assert row.payload == payload[: RULES.max_payload_bytes]
    assert row.payload_bytes == len(payload)
    return decoded


@fuzz_settings(200)
@given(valid_alerts(), st.booleans())
def test_a_valid_alert_is_stored_as_sent_and_classified(alert: Alert, ascii_only: bool) -> None:
    check_alert(dumps(alert.body, ascii_only), alert.body, Stored(alert.fields))


# -- near-valid alerts ---------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, alert: Alert) -> tuple[Any, Outcome]:
    body, fields = alert.body, alert.fields
    name = draw(st.sampled_from(sorted(TYPES)))
    kind = draw(
        st.sampled_from(
            [
                "wrong_type",
                "bad_value",
                "nul",
                "drop",
                "duplicate",
                "extra",
                "bad_token",
                "lone_surrogate",
                "deep",
                "huge",
            ]
        )
    )
    if kind == "wrong_type":
        return body.set(name, draw(of_other_type(*TYPES[name]))), Refused(Code.SCHEMA, name)
    if kind == "bad_value":
        return draw(bad_value(body, name))
    if kind == "nul":
        target = draw(st.sampled_from(["alert_id", "user_id", "site_id", "note", "flags"]))
        value = draw(with_nul(ids(63)))
        if target == "note":
            stored = {**fields, "note": value.replace("\x00", "\ufffd")}
            return body.set("note", value), Stored(stored)
        if target == "flags":
            flags = [value]
            stored = {**fields, "flags": flags, **classified(fields, flags)}
            return body.set("flags", flags), Stored(stored)
        return body.set(target, value), Refused(Code.SCHEMA, target, NUL_MESSAGE)
    if kind == "drop":
        dropped = draw(st.sampled_from(REQUIRED))
        return body.drop(dropped), Refused(Code.SCHEMA, dropped)
    if kind == "duplicate":
        if draw(st.booleans()):
            first = draw(of_other_type(*TYPES[name]))
            return Obj(((name, first), *body.pairs)), Refused(Code.SCHEMA, name)
        twin = draw(valid_alerts()).body
        if name not in body or name not in twin:
            return body, Stored(fields)
        return Obj(((name, twin.get(name)), *body.pairs)), Stored(fields)
    if kind == "extra":
        key = draw(texts(1, 10).filter(lambda text: text not in KNOWN))
        return body.set(key, draw(of_other_type())), Stored(fields)
    if kind == "bad_token":
        token = Token(draw(st.sampled_from(BAD_TOKENS)))
        where = draw(st.sampled_from(["x", "note", "flags"]))
        # `0x10` is refused for its type (an int, to msgspec) before the payload is
        # read whole; the alert_id cannot be read from bytes that are not JSON.
        if where == "flags":
            if token.text == b"0x10":
                return body.set(where, [token]), Refused(Code.SCHEMA, "flags[0]", whole=True)
            return body.set(where, [token]), Refused(Code.MALFORMED, whole=True)
        if where == "note" and token.text == b"0x10":
            return body.set(where, token), Refused(Code.SCHEMA, "note", whole=True)
        return body.set(where, token), Refused(Code.MALFORMED, whole=True)
    if kind == "lone_surrogate":
        token = Token(draw(st.sampled_from(LONE_SURROGATES)))
        where = draw(st.sampled_from(["x", "alert_id", "note", "kind"]))
        return body.set(where, token), Refused(Code.MALFORMED, whole=True)
    if kind == "deep":
        depth = draw(st.integers(5_000, 60_000))
        message = "the payload is nested too deeply"
        return body.set("x", nested(depth)), Refused(Code.MALFORMED, None, message, whole=True)
    size = RULES.max_payload_bytes + draw(st.integers(0, 1000))
    return body.set(draw(st.sampled_from([name, "x"])), "h" * size), Refused(
        Code.TOO_LARGE, whole=True
    )


def classified(fields: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    classification, reasons = expected_classification(
        fields["kind"], fields["mood"], fields["stress"], flags
    )
    return {"base_classification": classification, "base_reasons": reasons}


@st.composite
def bad_value(draw: st.DrawFn, body: Obj, name: str) -> tuple[Obj, Outcome]:
    """A value of a right JSON type that breaks the field's rule."""
    if name in ("alert_id", "user_id"):
        text = draw(st.just("") | st.builds(stretch, texts(1, 3, nul=False), st.integers(65, 80)))
        return body.set(name, text), Refused(Code.SCHEMA, name)
    if name == "kind":
        word = draw(st.sampled_from(["Panic", "PANIC", "alarm", "", "panic "]) | texts())
        return body.set(name, word), Refused(Code.SCHEMA, name)
    if name == "occurred_at":
        if draw(st.booleans()):
            return body.set(name, draw(not_times())), Refused(Code.SCHEMA, name)
        text = draw(times_out_of_range()).text
        return body.set(name, text), Refused(Code.SCHEMA, name, OUT_OF_RANGE)
    if name in SCALES:
        top = SCALES[name]
        value: Any = draw(
            st.sampled_from([0, -1, top + 1, 2**63, 10**30, 1e300, -1e300, 0.5])
            | st.floats(1.01, top - 0.01).filter(lambda f: not f.is_integer())
        )
        return body.set(name, value), Refused(Code.SCHEMA, name)
    if name == "flags":
        flags = draw(st.lists(texts(max_size=4), max_size=2))
        index = len(flags)
        flags.append(draw(of_other_type("str")))
        return body.set(name, flags), Refused(Code.SCHEMA, f"flags[{index}]")
    if name == "site_id":
        value = draw(st.builds(stretch, texts(1, 3), st.integers(129, 140)))
        return body.set(name, value), Refused(Code.SCHEMA, name)
    if name == "note":
        char = draw(st.sampled_from(["n", "é", "€", "\x00", "𝄞"]))
        value = char * (RULES.max_note_bytes // len(char.encode()) + draw(st.integers(1, 50)))
        return body.set(name, value), Refused(Code.SCHEMA, name, "note is over 8192 bytes")
    # device_id
    other = draw(
        st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True).filter(lambda d: d != DEVICE)
    )
    if draw(st.booleans()):
        return body.set(name, other), Refused(Code.DEVICE_MISMATCH, name)
    return body.set(name, other + " "), Refused(Code.SCHEMA, name)


@st.composite
def near_valid_alerts(draw: st.DrawFn) -> tuple[bytes, Any, Outcome]:
    alert = draw(valid_alerts())
    ascii_only = draw(st.booleans())
    where = draw(st.sampled_from(["field", "field", "field", "field", "bytes"]))
    if where == "field":
        body, outcome = draw(mutated(alert))
        return dumps(body, ascii_only), body, outcome
    payload = dumps(alert.body, ascii_only)
    choice = draw(st.sampled_from(["cut", "not_object", "not_utf8"]))
    if choice == "cut":
        cut = payload[: draw(st.integers(0, len(payload) - 1))]
        return cut, alert.body, Refused(Code.MALFORMED, whole=True)
    if choice == "not_object":
        wrapped = draw(
            st.sampled_from([b"[" + payload + b"]", b"null", b"5", b'"x"', b"[]", b"true"])
        )
        message = "the payload is not a JSON object"
        return wrapped, alert.body, Refused(Code.MALFORMED, None, message, whole=True)
    at = draw(st.integers(0, len(payload)))
    broken = payload[:at] + draw(st.sampled_from(NOT_UTF8)) + payload[at:]
    message = "the payload is not UTF-8"
    return broken, alert.body, Refused(Code.MALFORMED, None, message, whole=True)


PANIC_WITH_NUL = (
    b'{"alert_id": "p-1", "user_id": "u", "kind": "panic",'
    b' "occurred_at": "2026-11-29T12:00:00Z", "note": "help\\u0000me"}'
)


@fuzz_settings(400)
@given(near_valid_alerts())
@example(  # A panic whose note holds a NUL is stored, not refused (docs/alerts.md).
    (
        PANIC_WITH_NUL,
        Obj.of({"alert_id": "p-1"}),
        Stored(
            {
                "alert_id": "p-1",
                "device_id": DEVICE,
                "user_id": "u",
                "kind": "panic",
                "occurred_at_us": 1_795_953_600_000_000,
                "received_at_us": RECEIVED_AT_US,
                "mood": None,
                "stress": None,
                "energy": None,
                "flags": [],
                "site_id": None,
                "note": "help\ufffdme",
                "base_classification": "crisis",
                "base_reasons": ["panic"],
                "low_mood_journal": False,
                "status": "pending",
                "classification": None,
                "reasons": [],
                "notified": None,
            }
        ),
    )
)
@example(  # Refused for its type before the bytes are found not to be JSON: no alert_id.
    (
        PANIC_WITH_NUL.replace(b'"help\\u0000me"', b"0x10"),
        Obj.of({"alert_id": "p-1"}),
        Refused(Code.SCHEMA, "note", whole=True),
    )
)
@example(  # Year 1 east of UTC is year 0 in UTC: the crisis could never be written out.
    (
        PANIC_WITH_NUL.replace(b"2026-11-29T12:00:00Z", b"0001-01-01T00:30:00+01:00"),
        Obj.of({"alert_id": "p-1"}),
        Refused(Code.SCHEMA, "occurred_at", OUT_OF_RANGE),
    )
)
def test_a_near_valid_alert_gets_the_answer_it_should(given_alert: Any) -> None:
    payload, body, outcome = given_alert
    check_alert(payload, body, outcome)


@fuzz_settings(200)
@given(st.binary(max_size=200) | st.builds(dumps, of_other_type()))
def test_any_bytes_get_a_typed_answer(payload: bytes) -> None:
    decoded = HANDLER.decode(TOPIC, DEVICE, payload, RECEIVED_AT_US)
    assert (decoded.record is None) != (decoded.error is None)
    if decoded.error is not None:
        assert isinstance(decoded.error, Error) and isinstance(decoded.error.code, Code)
        assert len(decoded.quarantine) == 1


# -- crisis acknowledgements ------------------------------------------------------------


@st.composite
def acks(draw: st.DrawFn) -> tuple[bytes, Obj, Outcome]:
    """A valid ack `{"alert_id", "by"}`, or one mutation of it; what it must give."""
    fields = {"alert_id": draw(ids(64)), "by": draw(ids(128))}
    body = Obj.of(fields)
    if draw(st.booleans()):
        body = Obj(tuple(reversed(body.pairs)))
    stored = Stored(fields)
    name = draw(st.sampled_from(["alert_id", "by"]))
    kind = draw(
        st.sampled_from(
            ["valid", "wrong_type", "long", "nul", "drop", "extra", "dup", "bytes", "deep"]
        )
    )
    outcome: Outcome = stored
    if kind == "wrong_type":
        body, outcome = body.set(name, draw(of_other_type("str"))), Refused(Code.SCHEMA, name)
    elif kind == "long":
        size = draw(st.sampled_from([0, 65 if name == "alert_id" else 129]))
        body, outcome = body.set(name, "x" * size), Refused(Code.SCHEMA, name)
    elif kind == "nul":
        body = body.set(name, draw(with_nul(ids(63))))
        outcome = Refused(Code.SCHEMA, name, NUL_MESSAGE)
    elif kind == "drop":
        body, outcome = body.drop(name), Refused(Code.SCHEMA, name)
    elif kind == "extra":
        key = draw(texts(1, 8).filter(lambda text: text not in ("alert_id", "by")))
        value: Any = draw(of_other_type() | not_utf8_string())
        body = body.set(key, value)
        if isinstance(value, Token):
            outcome = Refused(Code.MALFORMED, None, "the payload is not UTF-8")
    elif kind == "dup":
        body = Obj(((name, draw(ids(64))), *body.pairs))
    elif kind == "deep":
        body = body.set("x", nested(draw(st.integers(5_000, 60_000))))
        outcome = Refused(Code.MALFORMED, None, "the payload is nested too deeply")
    payload = dumps(body, draw(st.booleans()))
    if kind == "bytes":
        choice = draw(st.sampled_from(["cut", "not_object", "surrogate", "token"]))
        if choice == "cut":
            payload = payload[: draw(st.integers(0, len(payload) - 1))]
            outcome = Refused(Code.MALFORMED)
        elif choice == "not_object":
            payload = draw(st.sampled_from([b"[" + payload + b"]", b"null", b"5", b'"x"']))
            outcome = Refused(Code.MALFORMED, None, "the payload is not a JSON object")
        else:
            text = draw(
                st.sampled_from(LONE_SURROGATES if choice == "surrogate" else BAD_TOKENS[:4])
            )
            payload = dumps(body.set("x", Token(text)))
            outcome = Refused(Code.MALFORMED)
    return payload, body, outcome


@fuzz_settings(250)
@given(acks())
@example((b"[1]", Obj(()), Refused(Code.MALFORMED, None, "the payload is not a JSON object")))
@example(  # A skipped field's bytes are not checked by msgspec: not UTF-8 all the same.
    (
        b'{"alert_id": "a", "by": "b", "x": "\xff"}',
        Obj(()),
        Refused(Code.MALFORMED, None, "the payload is not UTF-8"),
    )
)
def test_a_crisis_ack_gets_the_answer_it_should(given_ack: Any) -> None:
    payload, _body, outcome = given_ack
    decoded: AckDecoded = HANDLER.decode_ack(ACK_TOPIC, payload, RECEIVED_AT_US)
    if isinstance(outcome, Stored):
        assert decoded.error is None, decoded.error
        assert decoded.record is not None
        assert (decoded.record.alert_id, decoded.record.by, decoded.record.received_at_us) == (
            outcome.fields["alert_id"],
            outcome.fields["by"],
            RECEIVED_AT_US,
        )
        assert decoded.quarantine == []
        return
    assert decoded.record is None and decoded.error is not None
    assert (decoded.error.code, decoded.error.path) == (outcome.code, outcome.path), decoded.error
    if outcome.message is not None:
        assert decoded.error.message == outcome.message
    (row,) = decoded.quarantine
    assert (row.kind, row.device_id, row.code, row.path) == (
        "crisis_ack",
        None,
        outcome.code.value,
        outcome.path,
    )
    assert row.payload == payload[: RULES.max_payload_bytes]
