"""Fuzzing `SyncHandler.decode`: valid operations and batches, and near-valid ones.

A valid payload (PROTOCOL.md, Sync operations) is accepted and its records hold
what was sent: every field, `changes` with `old` filled in, the device metadata as
its bytes, `edited_at` to the microsecond (computed apart, tests/support/fuzz.py).
A near-valid one (one mutation of a valid op, of a batch or of the bytes) gets the
answer predicted for it: the code, the path (`ops[i].` before it in a batch), the
op_id, and every other op of the batch stored. Any bytes at all get typed answers.
Each example runs the whole decoder; nothing may raise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config import LimitsConfig, SyncConfig
from handlers.errors import NUL_MESSAGE, Code, Error
from handlers.records import OpRecord
from handlers.sync import Decoded, Limits, Rejected, SyncHandler
from tests.support.fuzz import (
    BAD_TOKENS,
    DAY_US,
    JSON_VALUES,
    LONE_SURROGATES,
    MIN_US,
    OUT_OF_RANGE_NUMBERS,
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
    plain,
    stretch,
    texts,
    times,
    times_out_of_range,
    with_nul,
)

DEVICE = "dev-1"
TOPIC = f"fg/devices/{DEVICE}/sync"
RECEIVED_AT_US = 1_790_000_000_000_000
CONFIG = LimitsConfig()
LIMITS = Limits(
    max_payload_bytes=CONFIG.max_payload_bytes,
    max_ops=CONFIG.max_ops_per_batch,
    max_clock_skew_us=int(CONFIG.max_clock_skew_s * 1_000_000),
    max_device_meta_bytes=CONFIG.max_device_meta_bytes,
    entity_types=frozenset(SyncConfig().entity_types),
)
ENTITY_TYPES = sorted(LIMITS.entity_types)
LAST_VALID_US = 1_767_225_600_000_000
"""2026-01-01T00:00:00Z: past on every machine that runs this, so never in the future."""
FUTURE_US = int(datetime.now(UTC).timestamp()) * 1_000_000 + 2 * DAY_US
REQUIRED = ("op_id", "user_id", "entity_type", "entity_id", "operation", "edited_at")
TYPES = {
    "op_id": ("str",),
    "user_id": ("str",),
    "entity_type": ("str",),
    "entity_id": ("str",),
    "operation": ("str",),
    "edited_at": ("str",),
    "changes": ("object",),
    "base_version": ("int", "null"),
    "session_id": ("str", "null"),
    "device_id": ("str",),
}
"""The JSON types each field takes; any other is a `schema` error at the field."""
TEXT_COLUMNS = ("op_id", "user_id", "entity_id", "session_id")
"""A NUL in one of these is refused (PostgreSQL text); anywhere else it is kept."""
MAX_CHARS = {"op_id": 64, "user_id": 64, "entity_type": 64, "entity_id": 128, "session_id": 128}
KNOWN = frozenset({*TYPES, "device", "ops", "batch_id"})


# -- what must come out ---------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """The op is accepted as this record (its fields as `msgspec.structs.asdict`)."""

    fields: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    """The op alone is rejected: `code` at `path` (relative to the op)."""

    code: Code
    path: str | None
    message: str | None = None
    malformed_in_a_batch: bool = False
    """Refused for its type while the bytes are not JSON (`0x10`): a batch's envelope,
    read whole first, is malformed."""


@dataclass(frozen=True)
class Whole:
    """The whole payload is rejected: one result, op_id null."""

    code: Code
    path: str | None = None
    message: str | None = None


Outcome = Stored | Refused | Whole


@dataclass(frozen=True)
class Case:
    """A valid op, as sent and as it must be stored."""

    op: Obj
    fields: dict[str, Any]
    ascii_only: bool


def decode(payload: bytes) -> Decoded:
    return SyncHandler(LIMITS).decode(TOPIC, DEVICE, payload, RECEIVED_AT_US)


def lenient_op_id(op: Any) -> str | None:
    """The op_id a rejected op is answered with: its (last) op_id, if it is a string
    of 1 to 64 characters."""
    value = op.get("op_id") if isinstance(op, Obj) else None
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


def record_fields(record: OpRecord) -> dict[str, Any]:
    fields = msgspec.structs.asdict(record)
    # The JSON the writer stores holds the same changes.
    assert json.loads(fields.pop("changes_json")) == fields["changes"]
    return fields


def check_invariants(decoded: Decoded, payload: bytes) -> None:
    """What holds of any answer: typed items; one quarantine row per rejection, in order,
    holding a piece of the bytes received; an error's path wherever the code says where."""
    rejected = [item for item in decoded.items if isinstance(item, Rejected)]
    assert decoded.items, "every payload gets at least one result"
    assert len(decoded.quarantine) == len(rejected)
    for item in decoded.items:
        assert isinstance(item, OpRecord | Rejected)
    for item, row in zip(rejected, decoded.quarantine, strict=True):
        assert isinstance(item.error, Error)
        assert isinstance(item.error.code, Code)
        assert item.error.message
        if item.error.code in (Code.MALFORMED, Code.TOO_LARGE):
            assert item.error.path is None, item.error
        else:
            assert item.error.path, item.error
        assert (row.topic, row.device_id, row.kind) == (TOPIC, DEVICE, "sync")
        assert (row.code, row.message, row.path) == (
            item.error.code.value,
            item.error.message,
            item.error.path,
        )
        assert row.received_at_us == RECEIVED_AT_US
        assert row.payload in payload
        assert len(row.payload) <= LIMITS.max_payload_bytes


def check(payload: bytes, ops: list[Any], outcomes: list[Outcome], batch_id: Any = None) -> None:
    """Decode `payload` (the ops `ops`, a batch when `batch_id` is not None or there are
    several) and compare each result with its predicted outcome."""
    decoded = decode(payload)
    check_invariants(decoded, payload)
    whole = [outcome for outcome in outcomes if isinstance(outcome, Whole)]
    if whole:
        expected = whole[0]
        (item,) = decoded.items
        assert isinstance(item, Rejected), item
        assert (item.op_id, item.error.code, item.error.path) == (
            None,
            expected.code,
            expected.path,
        ), item.error
        if expected.message is not None:
            assert item.error.message == expected.message
        return
    in_batch = batch_id is not None
    assert decoded.batch_id == batch_id
    assert len(decoded.items) == len(outcomes)
    for index, (item, op, outcome) in enumerate(zip(decoded.items, ops, outcomes, strict=True)):
        if isinstance(outcome, Stored):
            assert isinstance(item, OpRecord), (index, item)
            assert record_fields(item) == {**outcome.fields, "batch_id": batch_id}
            continue
        assert isinstance(outcome, Refused)
        assert isinstance(item, Rejected), (index, item)
        prefix = f"ops[{index}]" if in_batch else ""
        path = prefix if outcome.path is None else f"{prefix}.{outcome.path}".lstrip(".")
        # An op that is not JSON (`0x10` refused for its type first) has no readable op_id.
        op_id = None if outcome.malformed_in_a_batch else lenient_op_id(op)
        assert (item.op_id, item.error.code) == (op_id, outcome.code), item
        if outcome.path == "changes…":
            assert item.error.path is not None
            assert item.error.path.startswith(f"{prefix}.changes".lstrip(".")), item.error
        else:
            assert item.error.path == path, item.error
        if outcome.message is not None:
            assert item.error.message == outcome.message


# -- valid operations -----------------------------------------------------------------

FIELD_NAMES = texts(1, 12) | st.builds(stretch, texts(1, 4), st.integers(120, 128))
SMALL_VALUES = JSON_VALUES


@st.composite
def changes_of(draw: st.DrawFn, operation: str) -> tuple[Obj | None, dict[str, Any]]:
    """`changes` as sent (None: left out) and as stored (`old` filled in)."""
    if operation == "delete" and draw(st.booleans()):
        return None, {}
    names = draw(
        st.lists(FIELD_NAMES, min_size=1 if operation == "update" else 0, max_size=3, unique=True)
    )
    sent: list[tuple[str, Any]] = []
    stored: dict[str, Any] = {}
    for name in names:
        new = draw(SMALL_VALUES)
        if operation == "create":
            old = draw(st.sampled_from([None, "absent"]))
        else:
            old = draw(SMALL_VALUES | st.just("absent"))
        entry = {"new": new} if old == "absent" else {"old": old, "new": new}
        if draw(st.booleans()):
            entry = dict(reversed(entry.items()))
        sent.append((name, entry))
        stored[name] = {"old": None if old == "absent" else old, "new": new}
    return Obj(tuple(sent)), stored


DEVICE_META = st.dictionaries(
    st.sampled_from(["platform", "app_version", "network", "model", "x"]) | texts(max_size=6),
    JSON_VALUES,
    max_size=3,
)


@st.composite
def valid_ops(draw: st.DrawFn, ascii_only: bool) -> Case:
    operation = draw(st.sampled_from(["create", "update", "delete"]))
    edited_at: Time = draw(times(MIN_US + DAY_US, LAST_VALID_US))
    sent: dict[str, Any] = {
        "op_id": draw(ids(64)),
        "user_id": draw(ids(64)),
        "entity_type": draw(st.sampled_from(ENTITY_TYPES)),
        "entity_id": draw(ids(128)),
        "operation": operation,
        "edited_at": edited_at.text,
    }
    changes, stored_changes = draw(changes_of(operation))
    if changes is not None:
        sent["changes"] = changes
    optional: dict[str, st.SearchStrategy[Any]] = {
        "device_id": st.just(DEVICE),
        "base_version": st.none() | st.integers(0, 2**63 - 1),
        "session_id": st.none() | ids(128),
        "device": st.none() | DEVICE_META,
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            sent[name] = draw(strategy)
    # One draw for the order of the keys (a permutation costs a draw per key).
    order = sorted(sent)
    random.Random(draw(st.integers(0, 2**16))).shuffle(order)
    op = Obj(tuple((name, sent[name]) for name in order))
    device = sent.get("device")
    fields = {
        "op_id": sent["op_id"],
        "device_id": DEVICE,
        "user_id": sent["user_id"],
        "entity_type": sent["entity_type"],
        "entity_id": sent["entity_id"],
        "operation": operation,
        "changes": stored_changes,
        "edited_at_us": edited_at.us,
        "received_at_us": RECEIVED_AT_US,
        "base_version": sent.get("base_version"),
        "session_id": sent.get("session_id"),
        "device_meta": None if device is None else dumps(device, ascii_only).decode(),
        "status": "pending",
        "version": None,
        "risk": None,
        "reasons": (),
    }
    return Case(op, fields, ascii_only)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, list[Any], list[Outcome], Any]:
    """A valid single op or batch: (bytes, ops, outcomes, batch_id)."""
    ascii_only = draw(st.booleans())
    if draw(st.booleans()):
        case = draw(valid_ops(ascii_only))
        return dumps(case.op, ascii_only), [case.op], [Stored(case.fields)], None
    cases = draw(st.lists(valid_ops(ascii_only), min_size=1, max_size=4))
    batch_id = draw(ids(64))
    envelope = Obj((("batch_id", batch_id), ("ops", [case.op for case in cases])))
    if draw(st.booleans()):
        envelope = Obj(tuple(reversed(envelope.pairs)))
    outcomes: list[Outcome] = [Stored(case.fields) for case in cases]
    return dumps(envelope, ascii_only), [case.op for case in cases], outcomes, batch_id


@fuzz_settings(150)
@given(payloads())
def test_a_valid_payload_is_stored_as_sent(given_payload: Any) -> None:
    payload, ops, outcomes, batch_id = given_payload
    check(payload, ops, outcomes, batch_id)


# -- near-valid operations: one mutation each, and what it must give ------------------


@st.composite
def mutated(draw: st.DrawFn, case: Case) -> tuple[Any, Outcome]:
    """One mutation of a valid op, and the outcome it must have."""
    op, fields = case.op, case.fields
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
                "out_of_range_number",
                "lone_surrogate",
                "not_utf8",
                "deep",
                "shallow",
                "change",
                "huge",
            ]
        )
    )
    if kind == "wrong_type":
        return op.set(name, draw(of_other_type(*TYPES[name]))), Refused(Code.SCHEMA, name)
    if kind == "bad_value":
        return draw(bad_value(op, name))
    if kind == "nul":
        nul_name = draw(st.sampled_from(["entity_type", *TEXT_COLUMNS]))
        value: Any = draw(with_nul(ids(MAX_CHARS[nul_name] - 1)))
        if nul_name == "entity_type":
            return op.set(nul_name, value), Refused(Code.UNKNOWN_ENTITY_TYPE, nul_name)
        return op.set(nul_name, value), Refused(Code.SCHEMA, nul_name, NUL_MESSAGE)
    if kind == "drop":
        dropped = draw(st.sampled_from([*REQUIRED, "changes"]))
        if dropped != "changes":
            return op.drop(dropped), Refused(Code.SCHEMA, dropped)
        if fields["operation"] == "delete":
            return op.drop("changes"), Stored({**fields, "changes": {}})
        message = f"changes is required for {fields['operation']}"
        return op.drop("changes"), Refused(Code.SCHEMA, "changes", message)
    if kind == "duplicate":
        # Each occurrence of a key is read and checked; the last one is kept.
        if draw(st.booleans()):
            first = draw(of_other_type(*TYPES[name]))
            return Obj(((name, first), *op.pairs)), Refused(Code.SCHEMA, name)
        twin = draw(valid_ops(case.ascii_only)).op
        if name not in op or name not in twin:
            return op, Stored(fields)
        return Obj(((name, twin.get(name)), *op.pairs)), Stored(fields)
    if kind == "extra":
        extra = draw(texts(1, 10).filter(lambda key: key not in KNOWN))
        return op.set(extra, draw(JSON_VALUES)), Stored(fields)
    if kind == "bad_token":
        # Where any value may be, it is read whole: not JSON. A typed field may refuse
        # the type its first character shows first (`0x10`: an int, then garbage).
        token = Token(draw(st.sampled_from(BAD_TOKENS)))
        where = draw(st.sampled_from(["x", "device", "changes", name]))
        if where == "changes":
            return op.set(where, Obj((("f", {"new": token}),))), Whole(Code.MALFORMED)
        if where == name and token.text == b"0x10" and name != "base_version":
            return op.set(where, token), Refused(Code.SCHEMA, name, malformed_in_a_batch=True)
        return op.set(where, token), Whole(Code.MALFORMED)
    if kind == "out_of_range_number":
        token = Token(draw(st.sampled_from(OUT_OF_RANGE_NUMBERS)))
        if draw(st.booleans()):
            return op.set(name, token), Refused(Code.SCHEMA, name)
        changes = Obj((("f", {"new": token}),))
        return op.set("changes", changes), Refused(Code.SCHEMA, "changes…")
    if kind == "lone_surrogate":
        token = Token(draw(st.sampled_from(LONE_SURROGATES)))
        where = draw(st.sampled_from(["x", "device", name]))
        return op.set(where, token), Whole(Code.MALFORMED)
    if kind == "not_utf8":
        value = draw(not_utf8_string())
        return op.set(draw(st.sampled_from([name, "x"])), value), Whole(Code.MALFORMED)
    if kind == "deep":
        # Deeper than msgspec recurses: refused whole, never raised.
        depth = draw(st.integers(5_000, 60_000))
        where = draw(st.sampled_from(["x", "changes", "device"]))
        value = nested(depth)
        if where == "changes":
            value = Obj((("f", {"new": value}),))
        elif where == "device":
            value = Obj((("x", value),))
        message = "the JSON is nested too deeply"
        return op.set(where, value), Whole(Code.MALFORMED, message=message)
    if kind == "shallow":
        depth = draw(st.integers(1, 150))
        leaf = draw(st.sampled_from([b"", b"1", b'"\\u0000"']))
        value = nested(depth, leaf)
        expected = json.loads(dumps(value))
        changes = Obj((("f", {"new": value}),))
        stored = {**fields, "changes": {"f": {"old": None, "new": expected}}}
        return op.set("changes", changes), Stored(stored)
    if kind == "change":
        return draw(bad_change(op, fields))
    # huge: a field past the payload limit
    size = LIMITS.max_payload_bytes + draw(st.integers(0, 1000))
    return op.set(draw(st.sampled_from([name, "x"])), "h" * size), Whole(Code.TOO_LARGE)


@st.composite
def bad_value(draw: st.DrawFn, op: Obj, name: str) -> tuple[Obj, Outcome]:
    """A value of the right JSON type that breaks the field's rule."""
    if name in MAX_CHARS:
        longest = MAX_CHARS[name]
        value = draw(st.just("") | st.text("x", min_size=longest + 1, max_size=longest + 40))
        if name == "entity_type" and value and draw(st.booleans()):
            unknown = draw(ids(64).filter(lambda text: text not in LIMITS.entity_types))
            return op.set(name, unknown), Refused(Code.UNKNOWN_ENTITY_TYPE, name)
        return op.set(name, value), Refused(Code.SCHEMA, name)
    if name == "operation":
        word = draw(st.sampled_from(["Create", "UPDATE", "remove", "", "create "]) | texts())
        return op.set(name, word), Refused(Code.SCHEMA, name)
    if name == "edited_at":
        choice = draw(st.sampled_from(["not_time", "out_of_range", "future"]))
        if choice == "not_time":
            return op.set(name, draw(not_times())), Refused(Code.SCHEMA, name)
        if choice == "out_of_range":
            text = draw(times_out_of_range()).text
            return op.set(name, text), Refused(Code.SCHEMA, name)
        future = draw(times(FUTURE_US, FUTURE_US + 3000 * 365 * DAY_US))
        return op.set(name, future.text), Refused(Code.EDITED_AT_IN_FUTURE, name)
    if name == "base_version":
        number = draw(
            st.sampled_from([-1, 2**63, -(2**63), 10**30, -(10**30), 2**64])
            | st.floats(allow_nan=False, allow_infinity=False)
        )
        return op.set(name, number), Refused(Code.SCHEMA, name)
    if name == "device_id":
        if draw(st.booleans()):
            other = draw(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
            if other != DEVICE:
                return op.set(name, other), Refused(Code.DEVICE_MISMATCH, name)
        bad = draw(st.just("") | texts(1, 70).filter(lambda t: not t.isascii() or " " in t))
        return op.set(name, bad or "a" * 65), Refused(Code.SCHEMA, name)
    # changes: an object whose entries are not {"old", "new"}
    return op.set("changes", draw(of_other_type("object"))), Refused(Code.SCHEMA, "changes")


@st.composite
def bad_change(draw: st.DrawFn, op: Obj, fields: dict[str, Any]) -> tuple[Obj, Outcome]:
    """One entry of `changes` that is not `{"old"?, "new"}` as the operation needs."""
    operation = fields["operation"]
    field = draw(texts(1, 8).filter(lambda text: text not in ("old", "new")))
    problem = draw(st.sampled_from(["not_object", "no_new", "unknown_key", "old", "name"]))
    if operation == "update" and draw(st.booleans()):
        return op.set("changes", Obj(())), Refused(Code.SCHEMA, "changes")
    if problem == "not_object":
        entry: Any = draw(of_other_type("object"))
        path = f"changes.{field}"
    elif problem == "no_new":
        entry = draw(st.sampled_from([{}, {"old": 1}]))
        path = f"changes.{field}.new"
    elif problem == "unknown_key":
        key = draw(texts(1, 8).filter(lambda text: text not in ("old", "new")))
        entry = {"new": 1, key: 2}
        path = f"changes.{field}.{key}"
    elif problem == "old" and operation == "create":
        entry = {"old": draw(of_other_type("null")), "new": 1}
        path = f"changes.{field}.old"
    else:
        field = draw(st.just("") | st.text("n", min_size=129, max_size=140))
        entry = {"new": 1}
        path = "changes"
    return op.set("changes", Obj(((field, entry),))), Refused(Code.SCHEMA, path)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[bytes, list[Any], list[Outcome], Any]:
    """A single op or a batch in which one op is mutated (the others stay valid), or a
    batch whose envelope is, or a payload whose bytes are cut."""
    ascii_only = draw(st.booleans())
    cases = draw(st.lists(valid_ops(ascii_only), min_size=1, max_size=2))
    ops: list[Any] = [case.op for case in cases]
    outcomes: list[Outcome] = [Stored(case.fields) for case in cases]
    target = draw(st.integers(0, len(cases) - 1))
    where = draw(st.sampled_from(["op", "op", "op", "envelope", "bytes"]))
    batch = len(cases) > 1 or where == "envelope" or draw(st.booleans())
    batch_id: Any = draw(ids(64)) if batch else None
    if where == "op":
        ops[target], outcomes[target] = draw(mutated(cases[target]))
        refused = outcomes[target]
        if batch and isinstance(refused, Refused) and refused.malformed_in_a_batch:
            outcomes = [Whole(Code.MALFORMED)]
    envelope = Obj((("batch_id", batch_id), ("ops", ops)))
    if where == "envelope":
        envelope, outcome = draw(bad_envelope(envelope, ops))
        outcomes = refused_not_object(ops, outcomes) if outcome is None else [outcome]
    if not batch:
        payload = dumps(ops[0], ascii_only)
    else:
        payload = dumps(envelope, ascii_only)
        batch_id = plain(envelope).get("batch_id")
    if where == "bytes":
        return draw(cut_or_wrapped(payload, ops, batch_id))
    return payload, ops, outcomes, batch_id


SMALL_OP = Obj.of(
    {
        "op_id": "m",
        "user_id": "u",
        "entity_type": "task",
        "entity_id": "e",
        "operation": "delete",
        "edited_at": "2026-01-01T00:00:00Z",
    }
)


@st.composite
def bad_envelope(draw: st.DrawFn, envelope: Obj, ops: list[Any]) -> tuple[Obj, Outcome | None]:
    problem = draw(
        st.sampled_from(["batch_id", "nul_batch_id", "ops_type", "empty", "too_many", "not_op"])
    )
    if problem == "batch_id":
        value = draw(of_other_type("str", "null") | st.just("") | st.just("b" * 65))
        return envelope.set("batch_id", value), Whole(Code.SCHEMA, "batch_id")
    if problem == "nul_batch_id":
        value = draw(with_nul(ids(63)))
        return envelope.set("batch_id", value), Whole(Code.SCHEMA, "batch_id", NUL_MESSAGE)
    if problem == "ops_type":
        value = draw(of_other_type("list"))
        message = "ops must be a list of operations"
        return envelope.set("ops", value), Whole(Code.SCHEMA, "ops", message)
    if problem == "empty":
        return envelope.set("ops", []), Whole(Code.SCHEMA, "ops")
    if problem == "too_many":
        count = LIMITS.max_ops + draw(st.integers(1, 3))
        return envelope.set("ops", [SMALL_OP] * count), Whole(Code.TOO_MANY_OPS, "ops")
    # An op of the batch that is not an object: that op alone, at `ops[i]`.
    index = draw(st.integers(0, len(ops) - 1))
    ops[index] = draw(of_other_type("object"))
    return envelope.set("ops", ops), None


def refused_not_object(ops: list[Any], outcomes: list[Outcome]) -> list[Outcome]:
    return [
        Refused(Code.SCHEMA, None) if not isinstance(op, Obj) else outcome
        for op, outcome in zip(ops, outcomes, strict=True)
    ]


@st.composite
def cut_or_wrapped(
    draw: st.DrawFn, payload: bytes, ops: list[Any], batch_id: Any
) -> tuple[bytes, list[Any], list[Outcome], Any]:
    """The payload cut short (never JSON: an object is not closed), or a valid JSON
    value that is not an object."""
    if draw(st.booleans()):
        cut = payload[: draw(st.integers(0, len(payload) - 1))]
        return cut, ops, [Whole(Code.MALFORMED)], batch_id
    wrapped = draw(st.sampled_from([b"[" + payload + b"]", b"null", b"5", b'"ops"', b"[]"]))
    message = "the payload is not a JSON object"
    return wrapped, ops, [Whole(Code.MALFORMED, message=message)], batch_id


SMALL_OP_BYTES = dumps(SMALL_OP)
DUPLICATE_OP_ID = (
    b'{"op_id": 5, "op_id": "a1", "user_id": "u", "entity_type": "task", "entity_id": "e",'
    b' "operation": "delete", "edited_at": "2026-11-29T12:00:00Z"}'
)


@fuzz_settings(500)
@given(near_valid())
@example(  # An instant before year 1 in UTC: stored, it could never be written back.
    (
        dumps(
            {
                "op_id": "y1",
                "user_id": "u",
                "entity_type": "task",
                "entity_id": "e",
                "operation": "delete",
                "edited_at": "0001-01-01T00:00:00+01:00",
            }
        ),
        [Obj.of({"op_id": "y1"})],
        [Refused(Code.SCHEMA, "edited_at")],
        None,
    )
)
@example(  # Refused for its type before the bytes are found not to be JSON: no op_id.
    (
        SMALL_OP_BYTES.replace(b'"u"', b"0x10"),
        [Obj.of({"op_id": "m"})],
        [Refused(Code.SCHEMA, "user_id", malformed_in_a_batch=True)],
        None,
    )
)
@example(  # Every occurrence of a key is checked, though the last is the one kept.
    (DUPLICATE_OP_ID, [Obj.of({"op_id": "a1"})], [Refused(Code.SCHEMA, "op_id")], None)
)
def test_a_near_valid_payload_gets_the_answer_it_should(given_payload: Any) -> None:
    payload, ops, outcomes, batch_id = given_payload
    check(payload, ops, outcomes, batch_id)


def test_the_last_of_duplicate_keys_is_kept() -> None:
    """PROTOCOL.md says nothing of duplicate keys: the gateway keeps the last one (as
    msgspec and most JSON readers do), after checking each (docs/devices.md)."""
    payload = DUPLICATE_OP_ID.replace(b'"op_id": 5', b'"op_id": "a0"')
    (record,) = decode(payload).items
    assert isinstance(record, OpRecord)
    assert record.op_id == "a1"


# -- anything at all ---------------------------------------------------------------------

JSONISH = st.lists(
    st.sampled_from(
        [
            *[b"{", b"}", b"[", b"]", b",", b":", b'"ops"', b'"op_id"', b'"a"', b"1", b"null"],
            *[b'"edited_at"', b'"2026-11-29T12:00:00Z"', b'"\\u0000"', b"\xff", b"NaN", b" "],
        ]
    ),
    max_size=40,
).map(b"".join)


@fuzz_settings(400)
@given(st.binary(max_size=200) | JSONISH)
@example(b'{"ops": [' + b"[" * 5000 + b"]" * 5000 + b"]}")
@example(b'{"ops": [{"op_id": "\\ud800"}]}')
def test_any_bytes_get_typed_answers(payload: bytes) -> None:
    check_invariants(decode(payload), payload)
