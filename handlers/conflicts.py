"""Conflicts v2 (PROTOCOL.md, "Conflicts (v2)"): the pair rule, and the group it builds.

Two stored operations collide when they are concurrent and their changes meet
(`judge`); a conflict is a connected group of that relation among one entity's
operations. `Group` is what a conflict keeps so that a new member, or a merge,
costs the same whatever the group's size: its fields, severity, devices, users,
member count, and per field the earliest and latest edit (the winners of both
strategies), never its members one by one.

No database, no clock: the detector (`storage.conflicts`) calls these on what it
loaded, so the rule lives in one place and is tested on its own.
"""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import msgspec

from handlers.errors import Code, Error, from_msgspec, refused_message
from handlers.fields import Str64, Str128
from handlers.records import OutboxRecord, QuarantineRecord, ResolutionRecord

Severity = Literal["low", "medium", "high", "critical"]
Strategy = Literal["last_writer_wins", "first_writer_wins", "manual"]
Status = Literal["open", "auto_resolved", "resolved", "merged"]

SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
RANK: dict[str, int] = {name: index for index, name in enumerate(SEVERITIES)}
MEMBERS_SHOWN = 50
"""A message or an answer carries at most this many members, the latest stored."""


# gc=False: a plain record (no reference back to what holds it), kept by the thousand in
# the engine's caches, which the collector would otherwise walk at every collection
# (docs/decisions/0019-small-batches.md).
class OpView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
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


# -- values -----------------------------------------------------------------------


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


_canonical_encode = msgspec.json.Encoder(order="sorted").encode
MAX_VALUE_KEY = 64
"""A canonical value longer than this is kept as its digest in the window summaries."""


def _canonical(value: Any) -> Any:
    """`value` with every number that equals an integer written as that integer."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    return value


def value_key(value: Any) -> str:
    """A short text that two values share exactly when they are equal as JSON.

    The canonical JSON (sorted keys, integral floats as integers: `1.0` is `1`,
    `true` stays `true`), or its 128-bit digest when long.
    """
    text = _canonical_encode(_canonical(value))
    if len(text) <= MAX_VALUE_KEY:
        return text.decode()
    return "#" + hashlib.blake2b(text, digest_size=16).hexdigest()


def new_value(change: Any) -> Any:
    return change.get("new") if isinstance(change, dict) else None


# -- the pair rule --------------------------------------------------------------------


class Pair(msgspec.Struct, frozen=True):
    """Two operations that collide: their colliding fields and the pair's severity."""

    fields: tuple[str, ...]
    severity: Severity


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
        if not json_equal(new_value(a.changes[name]), new_value(b.changes[name]))
    )


def severity(a: OpView, b: OpView, fields: Iterable[str], critical: frozenset[str]) -> Severity:
    """The first that holds: critical (one side deletes), high (a critical field),
    medium (two or more fields), low."""
    return pair_severity((a.operation == "delete") != (b.operation == "delete"), fields, critical)


def pair_severity(one_deletes: bool, fields: Iterable[str], critical: frozenset[str]) -> Severity:
    """`severity` for a pair of which exactly one side deletes (`one_deletes`) or not."""
    names = list(fields)
    if one_deletes:
        return "critical"
    if critical.intersection(names):
        return "high"
    if len(names) >= 2:
        return "medium"
    return "low"


def judge(a: OpView, b: OpView, rules: Rules) -> Pair | None:
    """The pair if `a` and `b` collide, else None."""
    if a.op_id == b.op_id or a.device_id == b.device_id:
        return None
    if a.entity_type != b.entity_type or a.entity_id != b.entity_id:
        return None
    if not concurrent(a, b, rules.window_us):
        return None
    fields = colliding_fields(a, b)
    if not fields:
        return None
    critical = rules.for_type(a.entity_type).critical_fields
    return Pair(tuple(fields), severity(a, b, fields, critical))


def higher(a: Severity, b: Severity) -> Severity:
    return a if RANK[a] >= RANK[b] else b


# -- the group ----------------------------------------------------------------------


class Edit(msgspec.Struct, frozen=True, array_like=True):
    """An edit's place in the order of the strategies: `edited_at`, ties by `op_id`."""

    at_us: int
    op_id: str


class Group(msgspec.Struct, kw_only=True):
    """What a conflict keeps of its members, enough to update it without reading them.

    `first`/`last` hold, per field any member changes, the earliest and latest
    edit of it (a delete changes every field: `first_delete`/`last_delete`);
    the winners of `first_writer_wins` and `last_writer_wins` are read off them.
    """

    fields: list[str] = msgspec.field(default_factory=list)
    severity: Severity = "low"
    device_ids: list[str] = msgspec.field(default_factory=list)
    user_ids: list[str] = msgspec.field(default_factory=list)
    member_count: int = 0
    first: dict[str, Edit] = msgspec.field(default_factory=dict)
    last: dict[str, Edit] = msgspec.field(default_factory=dict)
    first_delete: Edit | None = None
    last_delete: Edit | None = None

    def add(self, op: OpView) -> None:
        """A new member (not yet counted)."""
        self.member_count += 1
        _insort(self.device_ids, op.device_id)
        _insort(self.user_ids, op.user_id)
        edit = Edit(op.edited_at_us, op.op_id)
        if op.operation == "delete":
            self.first_delete = _earlier(self.first_delete, edit)
            self.last_delete = _later(self.last_delete, edit)
            return
        for name in op.changes:
            self.first[name] = _earlier(self.first.get(name), edit)
            self.last[name] = _later(self.last.get(name), edit)

    def collide(self, fields: Iterable[str], level: Severity) -> None:
        """A pair of members collides on `fields` with severity `level`."""
        self.fields = sorted(set(self.fields).union(fields))
        self.severity = higher(self.severity, level)

    def absorb(self, other: Group) -> None:
        self.collide(other.fields, other.severity)
        self.member_count += other.member_count
        for name in other.device_ids:
            _insort(self.device_ids, name)
        for name in other.user_ids:
            _insort(self.user_ids, name)
        for name, edit in other.first.items():
            self.first[name] = _earlier(self.first.get(name), edit)
        for name, edit in other.last.items():
            self.last[name] = _later(self.last.get(name), edit)
        if other.first_delete is not None:
            self.first_delete = _earlier(self.first_delete, other.first_delete)
        if other.last_delete is not None:
            self.last_delete = _later(self.last_delete, other.last_delete)

    def winners(self, strategy: Strategy) -> dict[str, str]:
        """Per conflict field, the member that wins it: the latest (or earliest) edit among
        the members that change the field, ties to the greater (or smaller) op_id."""
        if strategy == "manual":
            return {}
        out: dict[str, str] = {}
        for name in self.fields:
            if strategy == "last_writer_wins":
                edits = [e for e in (self.last.get(name), self.last_delete) if e is not None]
                pick = max
            else:
                edits = [e for e in (self.first.get(name), self.first_delete) if e is not None]
                pick = min
            if edits:
                out[name] = pick(edits, key=_order).op_id
        return out


def _insort(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)
        names.sort()


def _order(edit: Edit) -> tuple[int, str]:
    """`last_writer_wins` picks the greatest (latest, ties to the greater op_id),
    `first_writer_wins` the least."""
    return (edit.at_us, edit.op_id)


def _earlier(a: Edit | None, b: Edit) -> Edit:
    """The first writer: the earlier edit; on a tie the greater `op_id`, as for the last
    (PROTOCOL.md: "ties to the greater op_id", whichever the strategy)."""
    if a is None or b.at_us < a.at_us or (b.at_us == a.at_us and b.op_id > a.op_id):
        return b
    return a


def _later(a: Edit | None, b: Edit) -> Edit:
    if a is None or (b.at_us, b.op_id) > (a.at_us, a.op_id):
        return b
    return a


def automatic_status(level: Severity, strategy: Strategy, rules: Rules) -> Status:
    """`open` for an operator (strategy `manual`, or at/above `manual_at_or_above`),
    else `auto_resolved`."""
    if strategy == "manual" or RANK[level] >= RANK[rules.manual_at_or_above]:
        return "open"
    return "auto_resolved"


def new_conflict_id() -> str:
    """13 characters of base32 (64 random bits): unique among billions of conflicts,
    and short enough that `conflicts/list` fits a 100-column terminal and an operator
    can read one out over the phone."""
    return base64.b32encode(secrets.token_bytes(8)).decode().rstrip("=").lower()


# -- messages -----------------------------------------------------------------------

_encode = msgspec.json.Encoder().encode


class ConflictNotices(msgspec.Struct, frozen=True):
    """The messages of PROTOCOL.md, Conflicts (v2), as outbox records: one row for the
    operators' topic, copied to the devices' topics (one body, stored once); webhook
    events only for `webhook_events`, the events some configured endpoint subscribes
    to."""

    root: str = "fieldgate"
    webhook_events: frozenset[str] = frozenset()

    def event(
        self, event: str, record: dict[str, Any], devices: Iterable[str], **extra: Any
    ) -> list[OutboxRecord]:
        body = _encode({"event": event, "conflict": record, **extra})
        copies = tuple(f"{self.root}/devices/{device}/conflicts" for device in sorted(set(devices)))
        rows = [
            OutboxRecord(
                channel="mqtt", topic=f"{self.root}/conflicts", also_to=copies, payload=body
            )
        ]
        if event in self.webhook_events:
            rows.append(OutboxRecord(channel="webhook", event_type=event, payload=body))
        return rows


# -- operators' resolutions ------------------------------------------------------------


class _Resolution(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64
    by: Str128
    winner_op_id: Str64 | None = None
    winners: dict[str, Str64] | None = None


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
        self.error = Error(Code.INVALID_ARGS, refused_message("resolution", error_name))
        return conflict, self.error


def decode_resolution(payload: bytes) -> ResolutionDecoded:
    """`{"conflict_id", "by", "winner_op_id"?, "winners"?}`; the command checked the same."""
    try:
        given = _resolution_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        error = from_msgspec(exc, None)
        return ResolutionDecoded(None, Error(Code.INVALID_ARGS, error.message, error.path))
    if given.winner_op_id is None and not given.winners:
        error = Error(Code.INVALID_ARGS, "give winner_op_id or winners", "winner_op_id")
        return ResolutionDecoded(None, error)
    record = ResolutionRecord(
        conflict_id=given.conflict_id,
        by=given.by,
        winner_op_id=given.winner_op_id,
        winners=dict(given.winners or {}),
    )
    return ResolutionDecoded(record, None)
