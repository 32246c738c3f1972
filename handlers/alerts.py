"""Alerts: bytes from `<root>/devices/<id>/alerts` to a record and its classification.

What the payload alone decides is decided here, purely: the schema, and the rules
of PROTOCOL.md that need no history (crisis, low mood, high stress). The history
rule `sustained_low_mood` needs the user's stored entries and is applied by the
writer inside the transaction (storage/alerts.py).

Privacy: a payload may hold a person's note. Error messages never echo a value
from the payload (msgspec's enum errors do: they are rewritten), and a rejected
payload's raw bytes go only to the quarantine, where they are never shown.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from handlers.errors import (
    NUL_ESCAPE,
    NUL_MESSAGE,
    Code,
    Error,
    from_msgspec,
    nul_field,
    quarantine_record,
    refused_message,
)
from handlers.fields import AwareTime, DeviceId, Str64, Str128
from handlers.records import AlertRecord, CrisisAckRecord, OutboxRecord, QuarantineRecord
from handlers.times import OUT_OF_RANGE, in_range, rfc3339, to_us

Kind = Literal["journal", "panic", "checkin"]

CRISIS = "crisis"
WELLNESS = "wellness"
NONE = "none"

LOW_MOOD_HIGH_STRESS = "low_mood_high_stress"
SUSTAINED_LOW_MOOD = "sustained_low_mood"
LOW_MOOD = "low_mood"
HIGH_STRESS = "high_stress"
WELLNESS_REASONS = (SUSTAINED_LOW_MOOD, LOW_MOOD, HIGH_STRESS)

SCALES = ("mood", "stress", "energy")
PLAIN_FIELDS = ("alert_id", "user_id", "site_id")
"""The ids of an alert stored as text columns: one with a NUL is refused (`flags` is
stored as JSON, where a NUL stays the escape `\\u0000`)."""
NUL_REPLACEMENT = "\ufffd"
"""What a NUL in the free text (`note`) is stored as: PostgreSQL text cannot hold a NUL,
and a panic must not be refused for a detail of its text (docs/alerts.md)."""
ACK_FIELDS = ("alert_id", "by")


class AlertPayload(msgspec.Struct):
    alert_id: Str64
    user_id: Str64
    kind: Kind
    occurred_at: AwareTime
    # Numbers compare by value (PROTOCOL.md, Conventions): 2.0 is the integer 2. An
    # alert is not refused for the way a device's JSON library writes a number.
    mood: Annotated[float, Meta(ge=1, le=10)] | None = None
    stress: Annotated[float, Meta(ge=1, le=5)] | None = None
    energy: Annotated[float, Meta(ge=1, le=10)] | None = None
    flags: list[str] | None = None
    site_id: Annotated[str, Meta(max_length=128)] | None = None
    note: str | None = None
    device_id: DeviceId | UnsetType = UNSET


class AlertIdOnly(msgspec.Struct):
    alert_id: Any = None


class CrisisAckPayload(msgspec.Struct):
    alert_id: Str64
    by: Str128


class AlertRules(msgspec.Struct, frozen=True):
    """The classification rules of the config (`[alerts]`), as the handler needs them."""

    crisis_kinds: frozenset[str] = frozenset({"panic"})
    crisis_flags: tuple[str, ...] = ("self_harm_risk", "suicidal_ideation", "violence", "injury")
    crisis_mood_max: int = 2
    crisis_stress_min: int = 5
    wellness_mood_max: int = 4
    wellness_stress_min: int = 4
    max_payload_bytes: int = 256 * 1024
    max_note_bytes: int = 8192


class AlertDecoded(msgspec.Struct):
    """One alert payload: the record to store, or the error it was refused with."""

    alert_id: str | None
    record: AlertRecord | None
    error: Error | None
    quarantine: list[QuarantineRecord]

    @property
    def records(self) -> list[AlertRecord]:
        return [] if self.record is None else [self.record]

    def rejections(self) -> list[tuple[str | None, Error]]:
        return [] if self.error is None else [(self.alert_id, self.error)]

    def refuse(self, _record: object, error_name: str) -> tuple[str | None, Error]:
        """The database refused the alert alone: answer it rejected."""
        self.record = None
        self.error = Error(Code.SCHEMA, refused_message("alert", error_name))
        return self.alert_id, self.error


class AckDecoded(msgspec.Struct):
    record: CrisisAckRecord | None
    error: Error | None
    quarantine: list[QuarantineRecord]

    @property
    def records(self) -> list[CrisisAckRecord]:
        return [] if self.record is None else [self.record]

    def rejections(self) -> list[tuple[str | None, Error]]:
        return [] if self.error is None else [(None, self.error)]

    def refuse(self, _record: object, error_name: str) -> tuple[str | None, Error]:
        alert_id = self.record.alert_id if self.record is not None else None
        self.record = None
        self.error = Error(Code.SCHEMA, refused_message("acknowledgement", error_name))
        return alert_id, self.error


_alert_decoder = msgspec.json.Decoder(AlertPayload)
_encode = msgspec.json.Encoder().encode
_alert_id_decoder = msgspec.json.Decoder(AlertIdOnly)
_ack_decoder = msgspec.json.Decoder(CrisisAckPayload)
_ENUM_VALUE = re.compile(r"Invalid enum value .*?( - at `|$)", re.DOTALL)
_MISSING = re.compile(r"^Object missing required field `([a-z_]+)`")


def classify(
    rules: AlertRules,
    kind: str,
    mood: int | None,
    stress: int | None,
    flags: list[str],
) -> tuple[str, list[str]]:
    """(classification, reasons) by the rules that need no history; the first that holds.

    Crisis reasons are every crisis rule that holds: the kind (`panic`), each crisis
    flag present (in the config's order), `low_mood_high_stress`. Wellness reasons
    are `low_mood` then `high_stress`, those that hold.
    """
    reasons: list[str] = []
    if kind in rules.crisis_kinds:
        reasons.append(kind)
    present = set(flags)
    reasons.extend(flag for flag in rules.crisis_flags if flag in present)
    if (
        mood is not None
        and stress is not None
        and mood <= rules.crisis_mood_max
        and stress >= rules.crisis_stress_min
    ):
        reasons.append(LOW_MOOD_HIGH_STRESS)
    if reasons:
        return CRISIS, reasons
    if mood is not None and mood <= rules.wellness_mood_max:
        reasons.append(LOW_MOOD)
    if stress is not None and stress >= rules.wellness_stress_min:
        reasons.append(HIGH_STRESS)
    if reasons:
        return WELLNESS, reasons
    return NONE, []


class AlertHandler:
    """Turns one alert payload into an `AlertDecoded`; pure."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules

    def decode(
        self, topic: str, device_id: str, payload: bytes, received_at_us: int
    ) -> AlertDecoded:
        rules = self.rules

        def reject(alert_id: str | None, error: Error) -> AlertDecoded:
            quarantine = quarantine_record(
                topic=topic,
                device_id=device_id,
                kind="alert",
                error=error,
                payload=payload,
                received_at_us=received_at_us,
                max_payload_bytes=rules.max_payload_bytes,
            )
            return AlertDecoded(alert_id, None, error, [quarantine])

        size = len(payload)
        if size > rules.max_payload_bytes:
            return reject(
                None,
                Error(
                    Code.TOO_LARGE,
                    f"payload is {size} bytes, over the limit of {rules.max_payload_bytes}",
                ),
            )
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return reject(None, Error(Code.MALFORMED, "the payload is not UTF-8"))
        try:
            alert = _alert_decoder.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            error = _error(exc)
            if error.code is Code.MALFORMED:
                return reject(None, error)
            if error.path is None and "Expected `object`" in error.message:
                return reject(None, Error(Code.MALFORMED, "the payload is not a JSON object"))
            return reject(_lenient_alert_id(payload), error)
        except RecursionError:
            return reject(None, Error(Code.MALFORMED, "the payload is nested too deeply"))
        if not isinstance(alert.device_id, UnsetType) and alert.device_id != device_id:
            return reject(
                alert.alert_id,
                Error(Code.DEVICE_MISMATCH, "device_id is not the topic's device", "device_id"),
            )
        nul = nul_field(alert, PLAIN_FIELDS) if NUL_ESCAPE in payload else None
        if nul is not None:
            return reject(alert.alert_id, Error(Code.SCHEMA, NUL_MESSAGE, nul))
        if alert.note is not None and len(alert.note.encode()) > rules.max_note_bytes:
            return reject(
                alert.alert_id,
                Error(Code.SCHEMA, f"note is over {rules.max_note_bytes} bytes", "note"),
            )
        occurred_at_us = to_us(alert.occurred_at)
        if not in_range(occurred_at_us):
            return reject(alert.alert_id, Error(Code.SCHEMA, OUT_OF_RANGE, "occurred_at"))
        scales: dict[str, int | None] = {}
        for name in SCALES:
            value: float | None = getattr(alert, name)
            if value is not None and not value.is_integer():
                return reject(alert.alert_id, Error(Code.SCHEMA, "Expected `int`", name))
            scales[name] = None if value is None else int(value)
        mood, stress = scales["mood"], scales["stress"]
        flags = alert.flags or []
        classification, reasons = classify(rules, alert.kind, mood, stress, flags)
        record = AlertRecord(
            alert_id=alert.alert_id,
            device_id=device_id,
            user_id=alert.user_id,
            kind=alert.kind,
            occurred_at_us=occurred_at_us,
            received_at_us=received_at_us,
            mood=mood,
            stress=stress,
            energy=scales["energy"],
            flags=flags,
            site_id=alert.site_id,
            note=_stored_text(alert.note),
            payload=payload,
            base_classification=classification,
            base_reasons=reasons,
            low_mood_journal=(
                alert.kind == "journal" and mood is not None and mood <= rules.wellness_mood_max
            ),
        )
        return AlertDecoded(alert.alert_id, record, None, [])

    def decode_ack(self, topic: str, payload: bytes, received_at_us: int) -> AckDecoded:
        """An operator's `{"alert_id", "by"}` on `<root>/alerts/crisis/ack`."""
        rules = self.rules
        error: Error
        if len(payload) > rules.max_payload_bytes:
            error = Error(Code.TOO_LARGE, f"payload is over {rules.max_payload_bytes} bytes")
        else:
            try:
                # msgspec checks the strings it reads, not those of the fields it skips.
                payload.decode("utf-8")
                ack = _ack_decoder.decode(payload)
            except UnicodeDecodeError:
                error = Error(Code.MALFORMED, "the payload is not UTF-8")
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                error = _error(exc)
                if error.path is None and "Expected `object`" in error.message:
                    error = Error(Code.MALFORMED, "the payload is not a JSON object")
            except RecursionError:
                error = Error(Code.MALFORMED, "the payload is nested too deeply")
            else:
                nul = nul_field(ack, ACK_FIELDS) if NUL_ESCAPE in payload else None
                if nul is None:
                    record = CrisisAckRecord(
                        alert_id=ack.alert_id, by=ack.by, received_at_us=received_at_us
                    )
                    return AckDecoded(record, None, [])
                error = Error(Code.SCHEMA, NUL_MESSAGE, nul)
        quarantine = quarantine_record(
            topic=topic,
            device_id=None,
            kind="crisis_ack",
            error=error,
            payload=payload,
            received_at_us=received_at_us,
            max_payload_bytes=rules.max_payload_bytes,
        )
        return AckDecoded(None, error, [quarantine])


def _error(exc: msgspec.ValidationError | msgspec.DecodeError) -> Error:
    """msgspec's error, with a path for missing fields and no value from the payload."""
    error = from_msgspec(exc, None)
    message = _ENUM_VALUE.sub(r"Invalid enum value\1", error.message)
    path = error.path
    missing = _MISSING.match(message)
    if missing and path is None:
        path = missing.group(1)
    return Error(error.code, message, path)


def _stored_text(text: str | None) -> str | None:
    """Free text as it is stored: each NUL replaced by U+FFFD."""
    return None if text is None else text.replace("\x00", NUL_REPLACEMENT)


def _lenient_alert_id(raw: bytes) -> str | None:
    try:
        alert_id = _alert_id_decoder.decode(raw).alert_id
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    return alert_id if isinstance(alert_id, str) and 0 < len(alert_id) <= 64 else None


# -- what alerts cause: topics and bodies, never a note nor any free text --------


class CrisisFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator is told of a crisis: ids, reasons and times, no text of the device."""

    alert_id: str
    user_id: str
    device_id: str
    site_id: str | None
    reasons: list[str]
    occurred_at_us: int
    detected_at_us: int


def topic_level(value: str) -> str:
    """A user id as one topic level: `/`, `+`, `#`, `%` and NUL percent-encoded."""
    if not any(c in value for c in "/+#%\x00"):
        return value
    return "".join(f"%{ord(c):02X}" if c in "/+#%\x00" else c for c in value)


_NOTIFICATIONS = uuid.UUID("5f0c8e52-52b4-4c6e-9a63-2a4fd1d0a7c1")


def notification_id(alert_id: str, reason: str) -> str:
    """Deterministic: a retried transaction writes the same notification."""
    return str(uuid.uuid5(_NOTIFICATIONS, f"{alert_id}/{reason}"))


class AlertNotices(msgspec.Struct, frozen=True):
    """The messages alerts cause, as outbox records (PROTOCOL.md, Alerts: out)."""

    root: str = "fieldgate"
    suggestions: Mapping[str, str] = msgspec.field(default_factory=dict)
    webhook_events: frozenset[str] = frozenset()
    """The event types some configured webhook endpoint subscribes to."""

    def crisis(
        self, facts: CrisisFacts, escalation: int, origin_at_us: int | None = None
    ) -> list[OutboxRecord]:
        """`<root>/alerts/crisis` (published at once on first detection) and its webhook
        event; `escalation` above 0 is a re-publication of an unacknowledged crisis."""
        body = _encode(
            {
                "alert_id": facts.alert_id,
                "user_id": facts.user_id,
                "device_id": facts.device_id,
                "site_id": facts.site_id,
                "reasons": facts.reasons,
                "occurred_at": rfc3339(facts.occurred_at_us, None),
                "detected_at": rfc3339(facts.detected_at_us, None),
                "escalation": escalation,
            }
        )
        event = "alert.crisis" if escalation == 0 else "alert.crisis.escalated"
        mqtt = OutboxRecord(
            channel="mqtt",
            topic=f"{self.root}/alerts/crisis",
            event_type=event,
            payload=body,
            origin_at_us=origin_at_us,
            urgent=escalation == 0,
        )
        return [mqtt, *self._webhook(event, body, origin_at_us)]

    def _webhook(self, event: str, body: bytes, origin_at_us: int | None) -> list[OutboxRecord]:
        """The webhook event, when an endpoint subscribes to it (none would send it else)."""
        if event not in self.webhook_events:
            return []
        row = OutboxRecord(
            channel="webhook", event_type=event, payload=body, origin_at_us=origin_at_us
        )
        return [row]

    def wellness(
        self, record: AlertRecord, reason: str, notification: str, now_us: int
    ) -> list[OutboxRecord]:
        """`<root>/alerts/wellness/<user_id>` and its webhook event."""
        body = _encode(
            {
                "notification_id": notification,
                "user_id": record.user_id,
                "reason": reason,
                "suggestion": self.suggestions.get(reason, ""),
                "created_at": rfc3339(now_us, None),
            }
        )
        origin = record.received_at_us
        mqtt = OutboxRecord(
            channel="mqtt",
            topic=f"{self.root}/alerts/wellness/{topic_level(record.user_id)}",
            event_type="alert.wellness",
            payload=body,
            origin_at_us=origin,
            urgent=True,
        )
        return [mqtt, *self._webhook("alert.wellness", body, origin)]
