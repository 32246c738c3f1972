"""The conflict definition of PROTOCOL.md, as pure functions on two stored operations.

No database, no clock: the detector (`storage.conflicts`) calls these on the
candidates it fetched, so the rule lives in one place and is tested on its own.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from handlers.errors import Code, Error, from_msgspec, refused_message
from handlers.fields import Str64, Str128
from handlers.records import OutboxRecord, QuarantineRecord, ResolutionRecord

Severity = Literal["low", "medium", "high", "critical"]
Strategy = Literal["last_writer_wins", "first_writer_wins", "manual"]
Status = Literal["open", "auto_resolved", "resolved"]

SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
RANK: dict[str, int] = {name: index for index, name in enumerate(SEVERITIES)}

_NAMESPACE = uuid.UUID("8d3e4f1a-5b7c-4c2d-9e0f-1a2b3c4d5e6f")


class OpView(msgspec.Struct, frozen=True, kw_only=True):
    """What the rule needs of a stored operation (a sync_log row or a fresh record)."""

    op_id: str
    device_id: str
    user_id: str
    entity_type: str
    entity_id: str
    operation: str
    changes: Mapping[str, Any]
    edited_at_us: int
    version: int
    base_version: int | None = None


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """A conflicting pair as the definition sees it, sides in op_id order."""

    a: OpView
    b: OpView
    fields: list[str]
    severity: Severity
    strategy: Strategy
    status: Status
    winner_op_id: str | None

    @property
    def op_ids(self) -> tuple[str, str]:
        return (self.a.op_id, self.b.op_id)


class TypeRules(msgspec.Struct, frozen=True):
    strategy: Strategy
    critical_fields: frozenset[str]


class Rules(msgspec.Struct, frozen=True):
    """The configuration the definition depends on, per entity type."""

    window_us: int
    manual_at_or_above: Severity
    types: Mapping[str, TypeRules]
    default: TypeRules = TypeRules("last_writer_wins", frozenset())

    def for_type(self, entity_type: str) -> TypeRules:
        return self.types.get(entity_type, self.default)


def json_equal(x: Any, y: Any) -> bool:
    """Equal as JSON: numbers by value (`1 == 1.0`), but `true` is not `1`."""
    if isinstance(x, bool) or isinstance(y, bool):
        return isinstance(x, bool) and isinstance(y, bool) and x == y
    if isinstance(x, int | float) and isinstance(y, int | float):
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(json_equal(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(json_equal(p, q) for p, q in zip(x, y, strict=True))
    if x is None or y is None:
        return x is None and y is None
    return type(x) is type(y) and bool(x == y)


def concurrent(a: OpView, b: OpView, window_us: int) -> bool:
    """X is the one stored later (higher version); its base_version decides, else the window."""
    x, y = (a, b) if a.version > b.version else (b, a)
    if x.base_version is not None:
        return y.version > x.base_version
    return abs(a.edited_at_us - b.edited_at_us) <= window_us


def colliding_fields(a: OpView, b: OpView) -> list[str]:
    """The sorted fields both change, less those they agree on.

    A delete changes every field, so against a non-delete the collision is the
    other side's changed fields; two deletes agree. A create changes the fields
    it sets.
    """
    a_delete, b_delete = a.operation == "delete", b.operation == "delete"
    if a_delete and b_delete:
        return []
    if a_delete:
        return sorted(b.changes)
    if b_delete:
        return sorted(a.changes)
    return sorted(
        name
        for name in a.changes.keys() & b.changes.keys()
        if not json_equal(_new(a.changes[name]), _new(b.changes[name]))
    )


def severity(a: OpView, b: OpView, fields: Iterable[str], critical: frozenset[str]) -> Severity:
    names = list(fields)
    if (a.operation == "delete") != (b.operation == "delete"):
        return "critical"
    if critical.intersection(names):
        return "high"
    if len(names) >= 2:
        return "medium"
    return "low"


def winner(a: OpView, b: OpView, strategy: Strategy) -> str | None:
    """`last_writer_wins`: later edited_at, ties to the greater op_id; first: the other."""
    if strategy == "manual":
        return None
    later = max(a, b, key=lambda op: (op.edited_at_us, op.op_id))
    if strategy == "last_writer_wins":
        return later.op_id
    return b.op_id if later is a else a.op_id


def judge(a: OpView, b: OpView, rules: Rules) -> Verdict | None:
    """The conflict record's substance if `a` and `b` conflict, else None."""
    if a.op_id == b.op_id or a.device_id == b.device_id:
        return None
    if a.entity_type != b.entity_type or a.entity_id != b.entity_id:
        return None
    if not concurrent(a, b, rules.window_us):
        return None
    fields = colliding_fields(a, b)
    if not fields:
        return None
    if b.op_id < a.op_id:
        a, b = b, a
    type_rules = rules.for_type(a.entity_type)
    level = severity(a, b, fields, type_rules.critical_fields)
    strategy = type_rules.strategy
    if strategy == "manual" or RANK[level] >= RANK[rules.manual_at_or_above]:
        status: Status = "open"
        chosen = None
    else:
        status = "auto_resolved"
        chosen = winner(a, b, strategy)
    return Verdict(
        a=a,
        b=b,
        fields=fields,
        severity=level,
        strategy=strategy,
        status=status,
        winner_op_id=chosen,
    )


def values(verdict: Verdict) -> dict[str, dict[str, dict[str, Any]]]:
    """Per colliding field, each side's old and new value, keyed by op_id.

    A delete that does not list the field has `{"old": null, "new": null}`.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in verdict.fields:
        out[name] = {side.op_id: _side(side.changes.get(name)) for side in (verdict.a, verdict.b)}
    return out


def conflict_id(op_a: str, op_b: str) -> str:
    """Deterministic from the pair: the same pair is the same conflict everywhere."""
    first, second = sorted((op_a, op_b))
    return str(uuid.uuid5(_NAMESPACE, f"{first}\x00{second}"))


def _new(change: Any) -> Any:
    return change.get("new") if isinstance(change, dict) else None


def _side(change: Any) -> dict[str, Any]:
    if isinstance(change, dict):
        return {"old": change.get("old"), "new": change.get("new")}
    return {"old": None, "new": None}


def record_json(verdict: Verdict, detected_at: str) -> dict[str, Any]:
    """The conflict record of PROTOCOL.md for a new conflict (times already formatted)."""
    a, b = verdict.a, verdict.b
    return {
        "conflict_id": conflict_id(a.op_id, b.op_id),
        "entity_type": a.entity_type,
        "entity_id": a.entity_id,
        "op_ids": [a.op_id, b.op_id],
        "device_ids": [a.device_id, b.device_id],
        "user_ids": [a.user_id, b.user_id],
        "fields": verdict.fields,
        "values": values(verdict),
        "severity": verdict.severity,
        "strategy": verdict.strategy,
        "status": verdict.status,
        "winner_op_id": verdict.winner_op_id,
        "detected_at": detected_at,
        "resolved_at": None,
        "resolved_by": None,
    }


_encode = msgspec.json.Encoder().encode


def notices(root: str, event: str, record: dict[str, Any]) -> list[OutboxRecord]:
    """`<root>/conflicts`, each involved device's topic, and the webhook event."""
    payload = _encode({"event": event, "conflict": record})
    topics = [f"{root}/conflicts"] + [
        f"{root}/devices/{device}/conflicts" for device in dict.fromkeys(record["device_ids"])
    ]
    rows = [OutboxRecord(channel="mqtt", topic=topic, payload=payload) for topic in topics]
    rows.append(OutboxRecord(channel="webhook", event_type=event, payload=_encode(record)))
    return rows


class _Resolution(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64
    winner_op_id: Str64
    by: Str128


_resolution_decoder = msgspec.json.Decoder(_Resolution)


class ResolutionDecoded(msgspec.Struct):
    """An operator's resolution, as the admin command submits it to the writer."""

    record: ResolutionRecord | None
    error: Error | None
    quarantine: list[QuarantineRecord] = msgspec.field(default_factory=list)

    @property
    def records(self) -> list[ResolutionRecord]:
        return [] if self.record is None else [self.record]

    def rejections(self) -> list[tuple[str | None, Error]]:
        return [] if self.error is None else [(None, self.error)]

    def refuse(self, _record: object, error_name: str) -> tuple[str | None, Error]:
        conflict = self.record.conflict_id if self.record is not None else None
        self.record = None
        self.error = Error(Code.UNAVAILABLE, refused_message("resolution", error_name))
        return conflict, self.error


def decode_resolution(payload: bytes) -> ResolutionDecoded:
    """`{"conflict_id", "winner_op_id", "by"}`; the admin command has checked the same."""
    try:
        given = _resolution_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        error = from_msgspec(exc, None)
        return ResolutionDecoded(None, Error(Code.INVALID_ARGS, error.message, error.path))
    record = ResolutionRecord(
        conflict_id=given.conflict_id, winner_op_id=given.winner_op_id, by=given.by
    )
    return ResolutionDecoded(record, None)
