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
    decoded: Decoded, payload: bytes, code: str, path: str | None = None
) -> Rejected:
    """One result with op_id null, and the whole payload in quarantine."""
    item = only_rejection(decoded)
    assert item.op_id is None
    assert item.error.code.value == code
    assert item.error.path == path
    assert item.error.message
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


@pytest.mark.parametrize(("mutations", "expected"), FIELD_CASES)
def test_field_rule(mutations: dict[str, Any], expected: Any) -> None:
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
    assert (item.op_id, item.error.code.value, item.error.path) == (op_id, code, path)
    assert item.error.message
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
        changes_json=json.dumps(changes, separators=(",", ":")),
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


@pytest.mark.parametrize(
    "ops", [5, "o1", {"op_id": "o1"}, None], ids=["number", "string", "object", "null"]
)
def test_batch_whose_ops_is_not_a_list(ops: Any) -> None:
    payload = encode({"batch_id": "b-1", "ops": ops})
    assert_rejected_whole(decode(payload), payload, "schema", "ops")


def test_empty_batch() -> None:
    payload = encode({"batch_id": "b-1", "ops": []})
    assert_rejected_whole(decode(payload), payload, "schema", "ops")


def test_501_ops_is_too_many() -> None:
    ops = [make_op(op_id=f"o{i}") for i in range(MAX_OPS + 1)]
    payload = encode({"batch_id": "b-1", "ops": ops})
    assert len(payload) < MAX_PAYLOAD
    assert_rejected_whole(decode(payload), payload, "too_many_ops", "ops")


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


@pytest.mark.parametrize(("bad", "op_id", "code", "path"), BAD_OP_CASES)
def test_one_bad_op_in_a_batch_rejects_itself_alone(
    bad: Any, op_id: str | None, code: str, path: str
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
    assert (rejected.op_id, rejected.error.code.value, rejected.error.path) == (op_id, code, path)
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
    item = assert_rejected_whole(decode(payload), payload, "too_large")
    assert item.error.message == f"payload is {len(payload)} bytes, over the limit of 262144"


def test_payload_at_the_limit_is_decoded() -> None:
    op = make_op(changes={"note": {"old": None, "new": ""}})
    filler = MAX_PAYLOAD - len(encode(op))
    op["changes"]["note"]["new"] = "n" * filler
    payload = encode(op)
    assert len(payload) == MAX_PAYLOAD
    assert decode(payload).items == [expected_record(op)]


MALFORMED_CASES: list[Any] = [
    pytest.param(b"hello", id="not-json"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"op_id": "a1", ', id="truncated"),
    pytest.param(encode(make_op()) + b" {}", id="trailing-garbage"),
    pytest.param(b'{"op_id": "a\xff\xfe1", "user_id": "u1"}', id="not-utf8-in-string"),
    pytest.param("{}".encode("utf-16"), id="utf16"),
    pytest.param(b"\xff\xfe\xfd", id="binary"),
    pytest.param(encode([make_op()]), id="json-array"),
    pytest.param(b"42", id="json-number"),
    pytest.param(b'"op"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"true", id="json-bool"),
]


@pytest.mark.parametrize("payload", MALFORMED_CASES)
def test_malformed_payload(payload: bytes) -> None:
    assert_rejected_whole(decode(payload), payload, "malformed")


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
