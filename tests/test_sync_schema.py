"""The sync schema of PROTOCOL.md, rule by rule, on `SyncHandler.decode` itself.

Every field gets a valid and an invalid case with the exact error code and path
the device would see; batch and whole-payload rules follow; and every rejection
must leave exactly one quarantine record holding the raw bytes it refused.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.config import LimitsConfig, SyncConfig
from handlers.errors import NUL_MESSAGE, Code, Error, join_path
from handlers.records import OpRecord
from handlers.sync import Decoded, Limits, Rejected, SyncHandler
from tests.support import iso, us

TOPIC = "fg/devices/d1/sync"
DEVICE = "d1"
RECEIVED_AT_US = 1_790_000_000_000_000
LIMITS_CONFIG = LimitsConfig()
MAX_PAYLOAD = LIMITS_CONFIG.max_payload_bytes
MAX_OPS = LIMITS_CONFIG.max_ops_per_batch
NOW = datetime.now(UTC)
DROP = object()
"""A mutation value meaning: remove the field."""


def limits() -> Limits:
    """The defaults, built as `gateway.daemon.sync_limits` builds them from the config."""
    return Limits(
        max_payload_bytes=LIMITS_CONFIG.max_payload_bytes,
        max_ops=LIMITS_CONFIG.max_ops_per_batch,
        max_clock_skew_us=int(LIMITS_CONFIG.max_clock_skew_s * 1_000_000),
        max_device_meta_bytes=LIMITS_CONFIG.max_device_meta_bytes,
        entity_types=frozenset(SyncConfig().entity_types),
    )


def make_op(**mutations: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op_id": "a1",
        "user_id": "u1",
        "entity_type": "task",
        "entity_id": "t1",
        "operation": "update",
        "changes": {"status": {"old": "open", "new": "done"}},
        "edited_at": "2026-11-29T12:00:00.123Z",
    }
    for name, value in mutations.items():
        if value is DROP:
            op.pop(name, None)
        else:
            op[name] = value
    return op


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def decode(payload: bytes, device_id: str = DEVICE) -> Decoded:
    handler = SyncHandler(limits())
    topic = f"fg/devices/{device_id}/sync"
    decoded = handler.decode(topic, device_id, payload, RECEIVED_AT_US)
    assert_quarantine_matches(decoded, payload, topic, device_id)
    return decoded


def assert_quarantine_matches(decoded: Decoded, payload: bytes, topic: str, device_id: str) -> None:
    """Exactly one quarantine record per rejected item, in order, raw and cut at the limit."""
    rejected = [item for item in decoded.items if isinstance(item, Rejected)]
    assert len(decoded.quarantine) == len(rejected)
    for item, record in zip(rejected, decoded.quarantine, strict=True):
        assert record.topic == topic
        assert record.device_id == device_id
        assert record.kind == "sync"
        assert record.received_at_us == RECEIVED_AT_US
        assert record.code == item.error.code.value
        assert record.message == item.error.message
        assert record.path == item.error.path
        assert len(record.payload) <= MAX_PAYLOAD
        assert record.payload_bytes >= len(record.payload)
        # The raw bytes are a piece of what was received, never re-encoded.
        assert record.payload in payload


def only_rejection(decoded: Decoded) -> Rejected:
    assert len(decoded.items) == 1, decoded.items
    (item,) = decoded.items
    assert isinstance(item, Rejected), item
    return item


def assert_rejected_whole(
    decoded: Decoded, payload: bytes, code: str, message: str, path: str | None = None
) -> Rejected:
    """One result with op_id null, and the whole payload in quarantine."""
    item = only_rejection(decoded)
    assert (item.op_id, item.error) == (None, Error(Code(code), message, path))
    (record,) = decoded.quarantine
    assert record.payload == payload[:MAX_PAYLOAD]
    assert record.payload_bytes == len(payload)
    return item


# -- one operation, field by field ------------------------------------------

STORED = "stored"

FIELD_CASES: list[Any] = [
    # op_id
    pytest.param({}, STORED, id="op_id-valid"),
    pytest.param({"op_id": "x" * 64}, STORED, id="op_id-64-chars"),
    pytest.param(
        {"op_id": DROP},
        ("schema", "op_id", None),
        id="op_id-missing",
    ),
    pytest.param({"op_id": ""}, ("schema", "op_id", None), id="op_id-empty"),
    pytest.param({"op_id": "x" * 65}, ("schema", "op_id", None), id="op_id-65-chars"),
    pytest.param({"op_id": 17}, ("schema", "op_id", None), id="op_id-not-a-string"),
    # user_id
    pytest.param({"user_id": "u" * 64}, STORED, id="user_id-64-chars"),
    pytest.param(
        {"user_id": DROP},
        ("schema", "user_id", "a1"),
        id="user_id-missing",
    ),
    pytest.param({"user_id": ""}, ("schema", "user_id", "a1"), id="user_id-empty"),
    pytest.param({"user_id": "u" * 65}, ("schema", "user_id", "a1"), id="user_id-65-chars"),
    pytest.param({"user_id": None}, ("schema", "user_id", "a1"), id="user_id-null"),
    # entity_type
    pytest.param({"entity_type": "work_order"}, STORED, id="entity_type-work_order"),
    pytest.param({"entity_type": "asset"}, STORED, id="entity_type-asset"),
    pytest.param({"entity_type": "attendance"}, STORED, id="entity_type-attendance"),
    pytest.param(
        {"entity_type": "invoice"},
        ("unknown_entity_type", "entity_type", "a1"),
        id="entity_type-unknown",
    ),
    pytest.param({"entity_type": 3}, ("schema", "entity_type", "a1"), id="entity_type-not-str"),
    # entity_id
    pytest.param({"entity_id": "e" * 128}, STORED, id="entity_id-128-chars"),
    pytest.param({"entity_id": "e" * 129}, ("schema", "entity_id", "a1"), id="entity_id-129"),
    pytest.param({"entity_id": ""}, ("schema", "entity_id", "a1"), id="entity_id-empty"),
    # operation
    pytest.param(
        {"operation": "create", "changes": {"status": {"old": None, "new": "open"}}},
        STORED,
        id="operation-create",
    ),
    pytest.param({"operation": "delete"}, STORED, id="operation-delete"),
    pytest.param({"operation": "upsert"}, ("schema", "operation", "a1"), id="operation-bad"),
    pytest.param({"operation": "UPDATE"}, ("schema", "operation", "a1"), id="operation-case"),
    # changes
    pytest.param({"changes": DROP}, ("schema", "changes", "a1"), id="changes-missing-update"),
    pytest.param({"changes": {}}, ("schema", "changes", "a1"), id="changes-empty-update"),
    pytest.param(
        {"operation": "create", "changes": DROP},
        ("schema", "changes", "a1"),
        id="changes-missing-create",
    ),
    pytest.param({"operation": "delete", "changes": {}}, STORED, id="changes-empty-delete"),
    pytest.param({"operation": "delete", "changes": DROP}, STORED, id="changes-missing-delete"),
    pytest.param(
        {"operation": "create", "changes": {"status": {"new": "open"}}},
        STORED,
        id="changes-create-old-omitted",
    ),
    pytest.param(
        {"operation": "create", "changes": {"status": {"old": "x", "new": "open"}}},
        ("schema", "changes.status.old", "a1"),
        id="changes-create-with-old",
    ),
    pytest.param(
        {"changes": {"status": {"old": "open"}}},
        ("schema", "changes.status.new", "a1"),
        id="changes-without-new",
    ),
    pytest.param(
        {"changes": {"status": "done"}},
        ("schema", "changes.status", "a1"),
        id="changes-value-not-object",
    ),
    pytest.param({"changes": ["status"]}, ("schema", "changes", "a1"), id="changes-not-object"),
    pytest.param(
        {"changes": {"status": {"old": None, "new": None}}},
        STORED,
        id="changes-null-new-is-a-value",
    ),
    # edited_at
    pytest.param({"edited_at": "2026-11-29T12:00:00+02:00"}, STORED, id="edited_at-offset"),
    pytest.param(
        {"edited_at": "2026-11-29T12:00:00"},
        ("schema", "edited_at", "a1"),
        id="edited_at-no-offset",
    ),
    pytest.param(
        {"edited_at": "yesterday"}, ("schema", "edited_at", "a1"), id="edited_at-not-a-date"
    ),
    pytest.param({"edited_at": 1764417600}, ("schema", "edited_at", "a1"), id="edited_at-number"),
    pytest.param(
        {"edited_at": DROP},
        ("schema", "edited_at", "a1"),
        id="edited_at-missing",
    ),
    pytest.param(
        {"edited_at": iso(NOW + timedelta(hours=1))},
        ("edited_at_in_future", "edited_at", "a1"),
        id="edited_at-an-hour-ahead",
    ),
    pytest.param(
        {"edited_at": iso(NOW + timedelta(seconds=120))}, STORED, id="edited_at-within-skew"
    ),
    pytest.param({"edited_at": iso(NOW - timedelta(hours=9))}, STORED, id="edited_at-hours-late"),
    # base_version
    pytest.param({"base_version": 0}, STORED, id="base_version-0"),
    pytest.param({"base_version": 2**63 - 1}, STORED, id="base_version-max"),
    pytest.param({"base_version": None}, STORED, id="base_version-null"),
    pytest.param({"base_version": -1}, ("schema", "base_version", "a1"), id="base_version-neg"),
    pytest.param(
        {"base_version": 2**63}, ("schema", "base_version", "a1"), id="base_version-2**63"
    ),
    pytest.param({"base_version": "3"}, ("schema", "base_version", "a1"), id="base_version-string"),
    pytest.param({"base_version": 1.5}, ("schema", "base_version", "a1"), id="base_version-float"),
    # session_id
    pytest.param({"session_id": "s-42"}, STORED, id="session_id-valid"),
    pytest.param({"session_id": 42}, ("schema", "session_id", "a1"), id="session_id-not-str"),
    # device
    pytest.param(
        {"device": {"platform": "android", "app_version": "3.2.1", "network": "cellular"}},
        STORED,
        id="device-object",
    ),
    pytest.param(
        {"device": {"platform": "ios", "notes": "n" * 3900}},
        STORED,
        id="device-under-4KiB",
    ),
    pytest.param({"device": None}, STORED, id="device-null"),
    pytest.param({"device": "android"}, ("schema", "device", "a1"), id="device-not-object"),
    pytest.param({"device": ["android"]}, ("schema", "device", "a1"), id="device-list"),
    pytest.param(
        {"device": {"platform": "ios", "notes": "n" * 4200}},
        ("schema", "device", "a1"),
        id="device-over-4KiB",
    ),
    # device_id
    pytest.param({"device_id": DEVICE}, STORED, id="device_id-same"),
    pytest.param(
        {"device_id": "d2"}, ("device_mismatch", "device_id", "a1"), id="device_id-mismatch"
    ),
    pytest.param({"device_id": 1}, ("schema", "device_id", "a1"), id="device_id-not-str"),
]


FIELD_MESSAGES: dict[str, str] = {
    "op_id-missing": "Object missing required field `op_id`",
    "op_id-empty": "Expected `str` of length >= 1",
    "op_id-65-chars": "Expected `str` of length <= 64",
    "op_id-not-a-string": "Expected `str`, got `int`",
    "user_id-missing": "Object missing required field `user_id`",
    "user_id-empty": "Expected `str` of length >= 1",
    "user_id-65-chars": "Expected `str` of length <= 64",
    "user_id-null": "Expected `str`, got `null`",
    "entity_type-unknown": "unknown entity type 'invoice'",
    "entity_type-not-str": "Expected `str`, got `int`",
    "entity_id-129": "Expected `str` of length <= 128",
    "entity_id-empty": "Expected `str` of length >= 1",
    "operation-bad": "Invalid enum value 'upsert'",
    "operation-case": "Invalid enum value 'UPDATE'",
    "changes-missing-update": "changes is required for update",
    "changes-empty-update": "an update changes at least one field",
    "changes-missing-create": "changes is required for create",
    "changes-create-with-old": "a create has no old value",
    "changes-without-new": "Object missing required field `new`",
    "changes-value-not-object": "Expected `object`, got `str`",
    "changes-not-object": "Expected `object`, got `array`",
    "edited_at-no-offset": "Expected `datetime` with a timezone component",
    "edited_at-not-a-date": "Invalid RFC3339 encoded datetime",
    "edited_at-number": "Expected `datetime`, got `int`",
    "edited_at-missing": "Object missing required field `edited_at`",
    "edited_at-an-hour-ahead": "edited_at is more than 300 s ahead of the gateway's clock",
    "base_version-neg": "Expected `int` >= 0",
    "base_version-2**63": "Expected `int` <= 9223372036854775807",
    "base_version-string": "Expected `int | null`, got `str`",
    "base_version-float": "Expected `int | null`, got `float`",
    "session_id-not-str": "Expected `str | null`, got `int`",
    "device-not-object": "Expected `object`",
    "device-list": "Expected `object`",
    "device-over-4KiB": "device metadata is over 4096 bytes",
    "device_id-mismatch": "device_id 'd2' is not the topic's 'd1'",
    "device_id-not-str": "Expected `str`, got `int`",
}
"""The message of each rejected case of FIELD_CASES, by its id."""


@pytest.mark.parametrize(("mutations", "expected"), FIELD_CASES)
def test_field_rule(
    mutations: dict[str, Any], expected: Any, request: pytest.FixtureRequest
) -> None:
    op = make_op(**mutations)
    payload = encode(op)
    decoded = decode(payload)
    assert decoded.batch_id is None
    assert len(decoded.items) == 1, decoded.items
    (item,) = decoded.items
    if expected == STORED:
        assert item == expected_record(op)
        assert decoded.quarantine == []
        return
    code, path, op_id = expected
    assert isinstance(item, Rejected), item
    message = FIELD_MESSAGES[request.node.callspec.id]
    assert (item.op_id, item.error) == (op_id, Error(Code(code), message, path))
    (record,) = decoded.quarantine
    assert record.payload == payload
    assert record.payload_bytes == len(payload)


def expected_record(op: dict[str, Any], device_id: str = DEVICE) -> OpRecord:
    """The record an accepted op must become, worked out from the op itself: `old`
    defaults to null, `changes` is kept as compact JSON, `device` as it was sent."""
    changes = {
        name: {"old": change.get("old"), "new": change["new"]}
        for name, change in op.get("changes", {}).items()
    }
    device = op.get("device")
    return OpRecord(
        op_id=op["op_id"],
        device_id=device_id,
        user_id=op["user_id"],
        entity_type=op["entity_type"],
        entity_id=op["entity_id"],
        operation=op["operation"],
        changes=changes,
        changes_json=json.dumps(changes, separators=(",", ":"), ensure_ascii=False),
        edited_at_us=us(op["edited_at"]),
        received_at_us=RECEIVED_AT_US,
        base_version=op.get("base_version"),
        session_id=op.get("session_id"),
        device_meta=None if device is None else json.dumps(device),
        batch_id=None,
        status="pending",
        version=None,
    )


def test_accepted_op_becomes_this_record() -> None:
    op = make_op(
        edited_at="2026-11-29T14:00:00.5+02:00",
        base_version=7,
        session_id="s-1",
        device_id=DEVICE,
        changes={"status": {"old": "open", "new": "done"}, "hours": {"old": 1, "new": 2.5}},
    )
    decoded = decode(encode(op))
    (record,) = decoded.records
    assert record == OpRecord(
        op_id="a1",
        device_id=DEVICE,
        user_id="u1",
        entity_type="task",
        entity_id="t1",
        operation="update",
        changes={"status": {"old": "open", "new": "done"}, "hours": {"old": 1, "new": 2.5}},
        changes_json='{"status":{"old":"open","new":"done"},"hours":{"old":1,"new":2.5}}',
        edited_at_us=us(datetime(2026, 11, 29, 12, 0, 0, 500_000, tzinfo=UTC)),
        received_at_us=RECEIVED_AT_US,
        base_version=7,
        session_id="s-1",
        device_meta=None,
        batch_id=None,
        status="pending",
        version=None,
    )


def test_device_comes_from_the_topic_not_the_payload() -> None:
    decoded = decode(encode(make_op()), device_id="van-7.north_2")
    assert decoded.items == [expected_record(make_op(), device_id="van-7.north_2")]


def test_device_metadata_is_kept() -> None:
    meta = {"platform": "android", "app_version": "3.2.1", "network": "wifi", "model": "X2"}
    decoded = decode(encode(make_op(device=meta)))
    assert decoded.items == [expected_record(make_op(device=meta))]
    assert decoded.records[0].device_meta == json.dumps(meta)


# -- batches ------------------------------------------------------------------


def test_batch_of_good_ops_is_accepted_in_order() -> None:
    ops = [make_op(op_id=f"o{i}", entity_id=f"t{i % 3}") for i in range(MAX_OPS)]
    decoded = decode(encode({"batch_id": "b-17", "ops": ops}))
    assert decoded.batch_id == "b-17"
    assert decoded.quarantine == []
    expected = [expected_record(op) for op in ops]
    for record in expected:
        record.batch_id = "b-17"
    assert decoded.items == expected


def test_batch_without_batch_id() -> None:
    ops = [make_op(op_id="o1"), make_op(op_id="o2")]
    decoded = decode(encode({"ops": ops}))
    assert decoded.batch_id is None
    assert decoded.items == [expected_record(op) for op in ops]


OPS_NOT_A_LIST = "ops must be a list of operations"


@pytest.mark.parametrize(
    "ops", [5, "o1", {"op_id": "o1"}, None], ids=["number", "string", "object", "null"]
)
def test_batch_whose_ops_is_not_a_list(ops: Any) -> None:
    payload = encode({"batch_id": "b-1", "ops": ops})
    assert_rejected_whole(decode(payload), payload, "schema", OPS_NOT_A_LIST, "ops")


def test_empty_batch() -> None:
    payload = encode({"batch_id": "b-1", "ops": []})
    assert_rejected_whole(
        decode(payload), payload, "schema", "a batch holds 1 to 500 operations", "ops"
    )


def test_501_ops_is_too_many() -> None:
    ops = [make_op(op_id=f"o{i}") for i in range(MAX_OPS + 1)]
    payload = encode({"batch_id": "b-1", "ops": ops})
    assert len(payload) < MAX_PAYLOAD
    assert_rejected_whole(
        decode(payload),
        payload,
        "too_many_ops",
        "batch has 501 operations, over the limit of 500",
        "ops",
    )


def test_batch_id_of_the_wrong_type() -> None:
    payload = encode({"batch_id": 17, "ops": [make_op()]})
    item = only_rejection(decode(payload))
    assert (item.op_id, item.error.code.value, item.error.path) == (None, "schema", "batch_id")


def _batch_with(bad: Any, index: int = 1, count: int = 3) -> tuple[bytes, list[bytes]]:
    """A batch of good ops with `bad` at `index`; also each op's raw bytes."""
    ops: list[Any] = [make_op(op_id=f"g{i}", entity_id=f"t{i}") for i in range(count)]
    ops[index] = bad
    raws = [json.dumps(op).encode() for op in ops]
    payload = b'{"batch_id": "b-9", "ops": [' + b", ".join(raws) + b"]}"
    assert json.loads(payload) == {"batch_id": "b-9", "ops": ops}
    return payload, raws


BAD_OP_CASES: list[Any] = [
    pytest.param(make_op(op_id="x1", changes={}), "x1", "schema", "ops[1].changes", id="rule"),
    pytest.param(make_op(op_id="x1", entity_id=5), "x1", "schema", "ops[1].entity_id", id="type"),
    pytest.param(
        make_op(op_id="x1", entity_type="invoice"),
        "x1",
        "unknown_entity_type",
        "ops[1].entity_type",
        id="entity-type",
    ),
    pytest.param(
        make_op(op_id="x1", device_id="d9"),
        "x1",
        "device_mismatch",
        "ops[1].device_id",
        id="device-mismatch",
    ),
    pytest.param(
        make_op(op_id="x1", edited_at=iso(NOW + timedelta(days=1))),
        "x1",
        "edited_at_in_future",
        "ops[1].edited_at",
        id="future",
    ),
    pytest.param(make_op(op_id=""), None, "schema", "ops[1].op_id", id="empty-op-id"),
    pytest.param(5, None, "schema", "ops[1]", id="item-a-number"),
    pytest.param(["op"], None, "schema", "ops[1]", id="item-a-list"),
    pytest.param(None, None, "schema", "ops[1]", id="item-null"),
]


BAD_OP_MESSAGES: dict[str, str] = {
    "rule": "an update changes at least one field",
    "type": "Expected `str`, got `int`",
    "entity-type": "unknown entity type 'invoice'",
    "device-mismatch": "device_id 'd9' is not the topic's 'd1'",
    "future": "edited_at is more than 300 s ahead of the gateway's clock",
    "empty-op-id": "Expected `str` of length >= 1",
    "item-a-number": "Expected `object`, got `int`",
    "item-a-list": "Expected `object`, got `array`",
    "item-null": "Expected `object`, got `null`",
}
"""The message of each case of BAD_OP_CASES, by its id."""


@pytest.mark.parametrize(("bad", "op_id", "code", "path"), BAD_OP_CASES)
def test_one_bad_op_in_a_batch_rejects_itself_alone(
    bad: Any, op_id: str | None, code: str, path: str, request: pytest.FixtureRequest
) -> None:
    payload, raws = _batch_with(bad)
    decoded = decode(payload)
    assert decoded.batch_id == "b-9"
    good0, rejected, good2 = decoded.items
    for good, index in ((good0, 0), (good2, 2)):
        expected = expected_record(make_op(op_id=f"g{index}", entity_id=f"t{index}"))
        expected.batch_id = "b-9"
        assert good == expected
    assert isinstance(rejected, Rejected)
    message = BAD_OP_MESSAGES[request.node.callspec.id]
    assert (rejected.op_id, rejected.error) == (op_id, Error(Code(code), message, path))
    (record,) = decoded.quarantine
    assert record.payload == raws[1]
    assert record.payload_bytes == len(raws[1])


def test_every_bad_op_of_a_batch_is_quarantined_once() -> None:
    ops: list[Any] = [make_op(op_id=f"o{i}") for i in range(6)]
    ops[0] = make_op(op_id="o0", user_id="")
    ops[3] = 7
    ops[5] = make_op(op_id="o5", operation="merge")
    payload = encode({"ops": ops})
    decoded = decode(payload)
    assert [(i.op_id, isinstance(i, Rejected)) for i in decoded.items] == [
        ("o0", True),
        ("o1", False),
        ("o2", False),
        (None, True),
        ("o4", False),
        ("o5", True),
    ]
    assert [q.path for q in decoded.quarantine] == ["ops[0].user_id", "ops[3]", "ops[5].operation"]


# -- whole payloads -----------------------------------------------------------


def test_payload_over_the_limit_is_too_large() -> None:
    op = make_op(changes={"note": {"old": None, "new": "n" * MAX_PAYLOAD}})
    payload = encode(op)
    assert len(payload) > MAX_PAYLOAD
    assert_rejected_whole(
        decode(payload),
        payload,
        "too_large",
        f"payload is {len(payload)} bytes, over the limit of 262144",
    )


def test_payload_at_the_limit_is_decoded() -> None:
    op = make_op(changes={"note": {"old": None, "new": ""}})
    filler = MAX_PAYLOAD - len(encode(op))
    op["changes"]["note"]["new"] = "n" * filler
    payload = encode(op)
    assert len(payload) == MAX_PAYLOAD
    assert decode(payload).items == [expected_record(op)]


NOT_UTF8 = "the payload is not UTF-8"
NOT_AN_OBJECT_MESSAGE = "the payload is not a JSON object"
TRUNCATED = "not valid JSON: Input data was truncated"
MALFORMED_CASES: list[Any] = [
    pytest.param(
        b"hello", "not valid JSON: JSON is malformed: invalid character (byte 0)", id="not-json"
    ),
    pytest.param(b"", TRUNCATED, id="empty"),
    pytest.param(b'{"op_id": "a1", ', TRUNCATED, id="truncated"),
    pytest.param(
        encode(make_op()) + b" {}",
        "not valid JSON: JSON is malformed: trailing characters (byte 195)",
        id="trailing-garbage",
    ),
    pytest.param(b'{"op_id": "a\xff\xfe1", "user_id": "u1"}', NOT_UTF8, id="not-utf8-in-string"),
    pytest.param("{}".encode("utf-16"), NOT_UTF8, id="utf16"),
    pytest.param(b"\xff\xfe\xfd", NOT_UTF8, id="binary"),
    pytest.param(encode([make_op()]), NOT_AN_OBJECT_MESSAGE, id="json-array"),
    pytest.param(b"42", NOT_AN_OBJECT_MESSAGE, id="json-number"),
    pytest.param(b'"op"', NOT_AN_OBJECT_MESSAGE, id="json-string"),
    pytest.param(b"null", NOT_AN_OBJECT_MESSAGE, id="json-null"),
    pytest.param(b"true", NOT_AN_OBJECT_MESSAGE, id="json-bool"),
]


@pytest.mark.parametrize(("payload", "message"), MALFORMED_CASES)
def test_malformed_payload(payload: bytes, message: str) -> None:
    assert_rejected_whole(decode(payload), payload, "malformed", message)


DEPTH = 100_000


def _deep_array() -> bytes:
    return b"[" * DEPTH + b"]" * DEPTH


def _deep_object() -> bytes:
    return b'{"a":' * (DEPTH // 4) + b"1" + b"}" * (DEPTH // 4)


def _in_change(value: bytes) -> bytes:
    template = encode(make_op(changes={"status": {"old": "open", "new": "@@"}}))
    return template.replace(b'"@@"', value)


TOO_DEEP = ("malformed", None, "the JSON is nested too deeply")
NOT_AN_OBJECT = ("malformed", None, "the payload is not a JSON object")

# payload -> (code, path, message) of the one rejection; op_id is null in every case:
# an op too deep to read has no op_id that can be read either.
DEEP_CASES: list[Any] = [
    # msgspec stops at the first `[`: not an object, whatever follows.
    pytest.param(_deep_array(), NOT_AN_OBJECT, id="whole-payload-arrays"),
    pytest.param(b"[" * DEPTH, NOT_AN_OBJECT, id="whole-payload-unclosed"),
    pytest.param(_deep_object(), TOO_DEEP, id="whole-payload-objects"),
    pytest.param(_in_change(_deep_array()), TOO_DEEP, id="change-value-arrays"),
    pytest.param(_in_change(_deep_object()), TOO_DEEP, id="change-value-objects"),
    pytest.param(b'{"batch_id": "b", "ops": [' + _deep_array() + b"]}", TOO_DEEP, id="batch-item"),
    pytest.param(
        b'{"batch_id": "b", "ops": [' + _in_change(_deep_array()) + b"]}",
        TOO_DEEP,
        id="batch-change-value",
    ),
    # A string expected: msgspec refuses the array at its first `[`, before any depth.
    pytest.param(
        encode(make_op()).replace(b'"u1"', _deep_array()),
        ("schema", "user_id", "Expected `str`, got `array`"),
        id="user-id",
    ),
]


@pytest.mark.parametrize(("payload", "expected"), DEEP_CASES)
def test_deep_nesting_is_rejected_not_raised(
    payload: bytes, expected: tuple[str, str | None, str]
) -> None:
    assert len(payload) <= MAX_PAYLOAD
    decoded = decode(payload)
    item = only_rejection(decoded)
    assert (item.op_id, item.error.code.value, item.error.path, item.error.message) == (
        None,
        *expected,
    )
    (record,) = decoded.quarantine
    assert record.payload == payload
    assert record.payload_bytes == len(payload)


def test_quarantine_keeps_payload_cut_at_the_limit() -> None:
    payload = b"\x00garbage" * 100_000
    decoded = decode(payload)
    item = only_rejection(decoded)
    assert item.error.code.value == "too_large"
    (record,) = decoded.quarantine
    assert record.payload == payload[:MAX_PAYLOAD]
    assert len(record.payload) == MAX_PAYLOAD
    assert record.payload_bytes == 800_000
    assert (record.topic, record.device_id, record.code, record.path) == (
        TOPIC,
        DEVICE,
        "too_large",
        None,
    )


def test_decoding_is_independent_per_payload() -> None:
    """A rejection leaves nothing behind in the handler for the next payload."""
    handler = SyncHandler(limits())
    bad = handler.decode(TOPIC, DEVICE, b"nope", RECEIVED_AT_US)
    good = handler.decode(TOPIC, DEVICE, encode(make_op()), RECEIVED_AT_US)
    assert len(bad.quarantine) == 1
    assert good.quarantine == []
    assert [r.op_id for r in good.records] == ["a1"]


# -- the edges of the rules, one by one ----------------------------------------------


def test_a_whole_payload_error_names_no_op_even_if_the_payload_has_an_op_id() -> None:
    payload = encode({"op_id": "x1", "batch_id": "b", "ops": 5})
    assert_rejected_whole(decode(payload), payload, "schema", OPS_NOT_A_LIST, "ops")


def test_an_op_id_that_can_be_read_is_reported_at_any_length_it_may_have() -> None:
    for op_id in ("x", "x" * 64):
        (item,) = decode(encode(make_op(op_id=op_id, entity_id=5))).items
        assert (item.op_id, item.error.path) == (op_id, "entity_id")  # type: ignore[union-attr]


def test_a_value_that_quotes_msgspec_s_path_marker_keeps_its_path() -> None:
    """msgspec ends its message with ` - at `$.path``: the last one is the path."""
    (item,) = decode(encode(make_op(operation=" - at `$.x"))).items
    assert item == Rejected(
        "a1", Error(Code.SCHEMA, "Invalid enum value ' - at `$.x'", "operation")
    )


def test_field_names_of_1_to_128_characters() -> None:
    ok = make_op(changes={"k" * 128: {"new": 1}})
    assert decode(encode(ok)).items == [expected_record(ok)]
    for name in ("", "k" * 129):
        (item,) = decode(encode(make_op(changes={name: {"new": 1}}))).items
        assert item == Rejected(
            "a1", Error(Code.SCHEMA, "a field name is 1 to 128 characters", "changes")
        )


def test_the_first_unknown_key_of_a_change_is_named() -> None:
    (item,) = decode(encode(make_op(changes={"status": {"new": 1, "b": 2, "a": 3}}))).items
    assert item == Rejected(
        "a1", Error(Code.SCHEMA, "Object contains unknown field `a`", "changes.status.a")
    )


def test_device_metadata_of_exactly_the_limit_is_kept() -> None:
    meta = {"notes": ""}
    meta["notes"] = "n" * (4096 - len(json.dumps(meta)))
    assert len(json.dumps(meta)) == 4096
    assert decode(encode(make_op(device=meta))).items == [expected_record(make_op(device=meta))]


NUL_CASES: list[Any] = [
    # (payload, the op's id and the error's path); strings of text columns only
    pytest.param(make_op(op_id="a\x00"), "a\x00", "op_id", id="op_id"),
    pytest.param(make_op(user_id="u\x00"), "a1", "user_id", id="user_id"),
    pytest.param(make_op(entity_id="t\x00"), "a1", "entity_id", id="entity_id"),
    pytest.param(make_op(session_id="s\x00"), "a1", "session_id", id="session_id"),
]


@pytest.mark.parametrize(("op", "op_id", "path"), NUL_CASES)
def test_a_nul_in_a_text_column_is_rejected(op: dict[str, Any], op_id: str, path: str) -> None:
    assert decode(encode(op)).items == [Rejected(op_id, Error(Code.SCHEMA, NUL_MESSAGE, path))]


def test_a_nul_in_a_batch() -> None:
    payload = encode({"batch_id": "b\x00", "ops": [make_op()]})
    assert_rejected_whole(decode(payload), payload, "schema", NUL_MESSAGE, "batch_id")
    batch = {"batch_id": "b", "ops": [make_op(op_id="o0"), make_op(op_id="o1", entity_id="\x00")]}
    decoded = decode(encode(batch))
    assert decoded.items[1] == Rejected("o1", Error(Code.SCHEMA, NUL_MESSAGE, "ops[1].entity_id"))
    assert isinstance(decoded.items[0], OpRecord)


def test_a_nul_inside_json_is_kept_as_sent() -> None:
    op = make_op(changes={"n\x00": {"old": None, "new": "v\x00"}}, device={"p": "\x00"})
    assert decode(encode(op)).items == [expected_record(op)]


def test_the_quarantine_cuts_the_device_id_and_the_topic_to_their_columns() -> None:
    device = "d" * 65
    topic = "fg/devices/" + device + "/sync" + "/x" * 300
    decoded = SyncHandler(limits()).decode(topic, device, b"{", RECEIVED_AT_US)
    (record,) = decoded.quarantine
    assert (record.device_id, record.topic) == ("d" * 64, topic[:512])


@pytest.mark.parametrize(
    ("batch", "count", "index", "path"),
    [
        (None, 1, 0, None),
        ("b-1", 3, 0, "ops[0]"),
        ("b-1", 3, 2, "ops[2]"),
        ("b-1", 1, 0, "ops[0]"),
        (None, 2, 1, "ops[1]"),
    ],
    ids=["single-op", "batch", "batch-third", "batch-of-one", "batch-without-id"],
)
def test_an_op_the_database_refused_is_rejected_in_place(
    batch: str | None, count: int, index: int, path: str | None
) -> None:
    """`refuse`: the database refused this record alone (the writer found it); it
    becomes this payload's rejection at its place, named by its path: `ops[i]` in a
    batch (one with an id, or of several ops), none for a payload of one op."""
    ops = [make_op(op_id=f"o{i}", entity_id=f"t{i}") for i in range(count)]
    if batch is None and count == 1:
        decoded = decode(encode(ops[0]))
    else:
        decoded = decode(encode({"batch_id": batch, "ops": ops} if batch else {"ops": ops}))
    record = decoded.items[index]
    before = list(decoded.items)
    refused = decoded.refuse(record, "CheckViolation")
    error = Error(Code.SCHEMA, "the database refused this operation (CheckViolation)", path)
    assert refused == (record.op_id, error)
    assert decoded.items == [
        Rejected(record.op_id, error) if i == index else item for i, item in enumerate(before)
    ]
    assert decoded.rejections() == [(record.op_id, error)]


@pytest.mark.parametrize(
    ("prefix", "path", "joined"),
    [
        ("ops[3]", "changes.status", "ops[3].changes.status"),
        ("ops[3]", "[0]", "ops[3][0]"),
        ("ops[3]", None, "ops[3]"),
        (None, "op_id", "op_id"),
        ("", "op_id", "op_id"),
        (None, None, None),
    ],
)
def test_join_path(prefix: str | None, path: str | None, joined: str | None) -> None:
    assert join_path(prefix, path) == joined


@pytest.mark.parametrize("device", ["bad id", "é", "d" * 65, ""], ids=["space", "é", "65", "empty"])
def test_a_device_id_in_the_topic_that_breaks_the_pattern(device: str) -> None:
    payload = encode(make_op())
    decoded = SyncHandler(limits()).decode(TOPIC, device, payload, RECEIVED_AT_US)
    message = "the device id in the topic is not [A-Za-z0-9_.-]{1,64}"
    assert decoded.items == [Rejected(None, Error(Code.SCHEMA, message))]
    (record,) = decoded.quarantine
    assert (record.device_id, record.payload) == (device[:64], payload)


def test_a_one_character_field_name_and_text_beyond_ascii() -> None:
    op = make_op(changes={"a": {"old": "é", "new": "ü"}}, user_id="ünïcode")
    assert decode(encode(op)).items == [expected_record(op)]
    raw = json.dumps(op, ensure_ascii=False).encode()
    assert not raw.isascii()
    assert decode(raw).items == [expected_record(op)]


def test_edited_at_as_far_back_as_rfc_3339_writes() -> None:
    """Year 1 an hour east of UTC is the first instant that can be written back; a
    microsecond earlier is year 0 in UTC, which no answer or message could carry
    (it was stored, and writing it raised OverflowError; found by fuzzing)."""
    first = make_op(edited_at="0001-01-01T01:00:00+01:00")
    (record,) = decode(encode(first)).items
    assert record == expected_record(first)
    assert isinstance(record, OpRecord) and record.edited_at_us == -62_135_596_800_000_000
    before = make_op(edited_at="0001-01-01T00:59:59.999999+01:00")
    message = "Expected a time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"
    assert only_rejection(decode(encode(before))) == Rejected(
        "a1", Error(Code.SCHEMA, message, "edited_at")
    )
