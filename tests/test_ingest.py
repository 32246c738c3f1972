"""Ingest end to end: a daemon process, the session broker, a device, its acks and rows.

Acks may coalesce several payloads of one device that were committed together
(`{"batch_ids": [...], "results": [...]}`), so where more than one payload is in
flight the tests match results by op_id, as a device does.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import (
    Admin,
    Client,
    Daemon,
    Mosquitto,
    ack_topic,
    db_rows,
    expect_results,
    send_one,
    sqlite_path,
    stored,
    sync_fence,
    sync_op,
    sync_topic,
    us,
    wait_for,
)

MAX_PAYLOAD = 256 * 1024


@pytest.fixture
def daemon(broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(broker.port)


def stored_ops(daemon: Daemon) -> list[tuple[Any, ...]]:
    return db_rows(
        daemon.db_url,
        "select op_id, device_id, entity_type, entity_id, version from sync_log order by id",
    )


def quarantined(daemon: Daemon) -> list[tuple[Any, ...]]:
    return db_rows(
        daemon.db_url,
        "select topic, device_id, kind, code, path, payload, payload_bytes"
        " from quarantine order by id",
    )


def assert_still_serving(daemon: Daemon, client: Client, op_id: str = "after-1") -> None:
    """A valid op after whatever came before is stored and acked `stored`."""
    client.publish(sync_topic(daemon.root), sync_op(op_id, entity_id="after"))
    (ack,) = client.expect(1, timeout=15)
    assert ack.topic == ack_topic(daemon.root)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": op_id, "status": "stored", "version": 1}],
    }
    assert db_rows(
        daemon.db_url, f"select op_id, version from sync_log where op_id = '{op_id}'"
    ) == [(op_id, 1)]


# -- one op, one batch -------------------------------------------------------


def test_single_op_is_stored_with_every_field(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root, "van-7"))
    op = sync_op(
        "op-1",
        entity_type="work_order",
        entity_id="wo-42",
        changes={"status": {"old": "open", "new": "done"}, "hours": {"old": 1, "new": 2.5}},
        user_id="alice",
        edited_at="2026-11-29T13:00:00.250+01:00",
        base_version=0,
        session_id="sess-9",
        device_id="van-7",
    )
    client.publish(sync_topic(daemon.root, "van-7"), op)
    (ack,) = client.expect(1)
    assert ack.topic == ack_topic(daemon.root, "van-7")
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "op-1", "status": "stored", "version": 1}],
    }
    rows = db_rows(
        daemon.db_url,
        "select op_id, device_id, user_id, entity_type, entity_id, operation, changes,"
        " edited_at, version, base_version, session_id, batch_id, device_meta from sync_log",
    )
    assert len(rows) == 1
    row = rows[0]
    assert row[:6] == ("op-1", "van-7", "alice", "work_order", "wo-42", "update")
    assert json.loads(row[6]) == op["changes"]
    assert row[7:] == (us("2026-11-29T12:00:00.250Z"), 1, 0, "sess-9", None, None)
    assert db_rows(daemon.db_url, "select entity_type, entity_id, version from entities") == [
        ("work_order", "wo-42", 1)
    ]
    assert quarantined(daemon) == []


def test_batch_gets_one_ack_with_every_result(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root))
    batch = {
        "batch_id": "b-17",
        "ops": [
            sync_op("a1", entity_id="t1"),
            sync_op("a2", entity_id="t2"),
            sync_op("a3", entity_id="t1", changes={"priority": {"old": 1, "new": 2}}),
            sync_op(
                "a4",
                entity_type="asset",
                entity_id="pump-3",
                operation="create",
                changes={"location": {"old": None, "new": "site-1"}},
            ),
            sync_op("a5", entity_id="t2", operation="delete", changes={}),
        ],
    }
    client.publish(sync_topic(daemon.root), batch)
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": "b-17",
        "results": [
            {"op_id": "a1", "status": "stored", "version": 1},
            {"op_id": "a2", "status": "stored", "version": 1},
            {"op_id": "a3", "status": "stored", "version": 2},
            {"op_id": "a4", "status": "stored", "version": 1},
            {"op_id": "a5", "status": "stored", "version": 2},
        ],
    }
    assert db_rows(
        daemon.db_url,
        "select op_id, entity_type, entity_id, operation, version, batch_id"
        " from sync_log order by op_id",
    ) == [
        ("a1", "task", "t1", "update", 1, "b-17"),
        ("a2", "task", "t2", "update", 1, "b-17"),
        ("a3", "task", "t1", "update", 2, "b-17"),
        ("a4", "asset", "pump-3", "create", 1, "b-17"),
        ("a5", "task", "t2", "delete", 2, "b-17"),
    ]
    assert sync_fence(client, daemon.root) == []


def test_many_payloads_of_one_device_match_by_op_id(daemon: Daemon, client: Client) -> None:
    """Sent back to back, they may share ack messages; every op gets one result, in order."""
    client.subscribe(ack_topic(daemon.root))
    for index in range(60):
        client.publish(
            sync_topic(daemon.root), sync_op(f"s{index:02d}", entity_id="t1"), wait=False
        )
    results = expect_results(client, 60)
    assert sorted(results, key=lambda r: r["op_id"]) == [
        {"op_id": f"s{index:02d}", "status": "stored", "version": index + 1} for index in range(60)
    ]
    assert [row[0] for row in stored_ops(daemon)] == [f"s{index:02d}" for index in range(60)]
    assert sync_fence(client, daemon.root) == []


# -- where the answer goes ---------------------------------------------------


def test_v5_response_topic_gets_the_answer_with_correlation(daemon: Daemon, client: Client) -> None:
    reply_a = f"{daemon.root}/replies/a"
    reply_b = f"{daemon.root}/replies/b"
    client.subscribe(ack_topic(daemon.root), reply_a, reply_b)
    client.publish(
        sync_topic(daemon.root), sync_op("r1"), response_topic=reply_a, correlation=b"\x00corr-1"
    )
    client.publish(
        sync_topic(daemon.root),
        {"batch_id": "rb", "ops": [sync_op("r2"), sync_op("r3", entity_id="t2")]},
        response_topic=reply_b,
        correlation=b"corr-2",
    )
    answers = {m.topic: m for m in client.expect(2)}
    assert set(answers) == {reply_a, reply_b}
    assert answers[reply_a].correlation == b"\x00corr-1"
    assert answers[reply_a].json() == {
        "batch_id": None,
        "results": [{"op_id": "r1", "status": "stored", "version": 1}],
    }
    assert answers[reply_b].correlation == b"corr-2"
    assert answers[reply_b].json() == {
        "batch_id": "rb",
        "results": [
            {"op_id": "r2", "status": "stored", "version": 2},
            {"op_id": "r3", "status": "stored", "version": 1},
        ],
    }
    # The answer goes there, and only there: nothing came on the ack topic before a
    # later answer.
    assert sync_fence(client, daemon.root) == []


def test_v5_response_topic_gets_rejections_too(daemon: Daemon, client: Client) -> None:
    reply = f"{daemon.root}/replies/x"
    client.subscribe(ack_topic(daemon.root), reply)
    client.publish(sync_topic(daemon.root), b"{nope", response_topic=reply, correlation=b"c-9")
    (answer,) = client.expect(1)
    assert (answer.topic, answer.correlation) == (reply, b"c-9")
    assert answer.json() == {
        "batch_id": None,
        "results": [
            {
                "op_id": None,
                "status": "rejected",
                "error": {
                    "code": "malformed",
                    "message": (
                        "not valid JSON: JSON is malformed: object keys must be strings (byte 1)"
                    ),
                },
            }
        ],
    }
    assert sync_fence(client, daemon.root) == []


def test_v311_client_is_answered_on_the_ack_topic(broker: Mosquitto, daemon: Daemon) -> None:
    old = Client(broker.port, v5=False).connect()
    try:
        old.subscribe(ack_topic(daemon.root, "legacy-1"))
        old.publish(sync_topic(daemon.root, "legacy-1"), sync_op("v3-1"))
        (ack,) = old.expect(1)
        assert ack.topic == ack_topic(daemon.root, "legacy-1")
        assert ack.json() == {
            "batch_id": None,
            "results": [{"op_id": "v3-1", "status": "stored", "version": 1}],
        }
    finally:
        old.close()
    assert stored_ops(daemon) == [("v3-1", "legacy-1", "task", "t1", 1)]


def test_answers_go_to_the_device_that_sent(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root, "d1"), ack_topic(daemon.root, "d2"))
    client.publish(sync_topic(daemon.root, "d1"), sync_op("from-d1", entity_id="shared"))
    client.publish(sync_topic(daemon.root, "d2"), sync_op("from-d2", entity_id="shared"))
    acks = {m.topic: m.json() for m in client.expect(2)}
    assert acks == {
        ack_topic(daemon.root, "d1"): {
            "batch_id": None,
            "results": [{"op_id": "from-d1", "status": "stored", "version": 1}],
        },
        ack_topic(daemon.root, "d2"): {
            "batch_id": None,
            "results": [{"op_id": "from-d2", "status": "stored", "version": 2}],
        },
    }


# -- exactly once ------------------------------------------------------------


def test_the_same_ops_twice_are_stored_once(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root))
    batch = {
        "batch_id": "b-1",
        "ops": [
            sync_op("e1", entity_id="t1"),
            sync_op("e2", entity_id="t1"),
            sync_op("e3", entity_id="t2"),
        ],
    }
    client.publish(sync_topic(daemon.root), batch)
    (first,) = client.expect(1)
    assert first.json() == {
        "batch_id": "b-1",
        "results": [
            {"op_id": "e1", "status": "stored", "version": 1},
            {"op_id": "e2", "status": "stored", "version": 2},
            {"op_id": "e3", "status": "stored", "version": 1},
        ],
    }
    client.publish(sync_topic(daemon.root), batch)
    (second,) = client.expect(1)
    assert second.json() == {
        "batch_id": "b-1",
        "results": [
            {"op_id": "e1", "status": "duplicate", "version": 1},
            {"op_id": "e2", "status": "duplicate", "version": 2},
            {"op_id": "e3", "status": "duplicate", "version": 1},
        ],
    }
    # One op of the batch again, alone, from another device's topic: still one row.
    client.subscribe(ack_topic(daemon.root, "d2"))
    client.publish(sync_topic(daemon.root, "d2"), sync_op("e2", entity_id="t1"))
    (third,) = client.expect(1)
    assert third.topic == ack_topic(daemon.root, "d2")
    assert third.json() == {
        "batch_id": None,
        "results": [{"op_id": "e2", "status": "duplicate", "version": 2}],
    }
    assert stored_ops(daemon) == [
        ("e1", "d1", "task", "t1", 1),
        ("e2", "d1", "task", "t1", 2),
        ("e3", "d1", "task", "t2", 1),
    ]
    assert db_rows(daemon.db_url, "select entity_id, version from entities order by 1") == [
        ("t1", 2),
        ("t2", 1),
    ]


def test_duplicates_within_one_commit(daemon: Daemon, client: Client) -> None:
    """The same op twice in a batch, and twice back to back: one row, one version."""
    client.subscribe(ack_topic(daemon.root))
    client.publish(
        sync_topic(daemon.root),
        {"batch_id": "b-2", "ops": [sync_op("w1"), sync_op("w2"), sync_op("w1")]},
    )
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": "b-2",
        "results": [
            {"op_id": "w1", "status": "stored", "version": 1},
            {"op_id": "w2", "status": "stored", "version": 2},
            {"op_id": "w1", "status": "duplicate", "version": 1},
        ],
    }
    for _ in range(5):
        client.publish(sync_topic(daemon.root), sync_op("w3"), wait=False)
    results = expect_results(client, 5)
    assert sorted(r["status"] for r in results) == ["duplicate"] * 4 + ["stored"]
    assert {(r["op_id"], r["version"]) for r in results} == {("w3", 3)}
    assert [(row[0], row[4]) for row in stored_ops(daemon)] == [("w1", 1), ("w2", 2), ("w3", 3)]
    assert sync_fence(client, daemon.root) == []


# -- what is refused ---------------------------------------------------------

DEPTH = 100_000
DEEP_ARRAY = b"[" * DEPTH + b"]" * DEPTH


def _deep_in_change() -> bytes:
    return json.dumps(sync_op("deep-1")).encode().replace(b'"done"', DEEP_ARRAY)


def _with_bad_op() -> bytes:
    return json.dumps(
        {"batch_id": "mixed", "ops": [sync_op("m1"), sync_op("m2", changes={}), sync_op("m3")]}
    ).encode()


# payload, the one result's op_id (None: the payload as a whole) and error
REFUSED: list[Any] = [
    pytest.param(
        b"this is not json",
        None,
        {
            "code": "malformed",
            "message": "not valid JSON: JSON is malformed: invalid character (byte 4)",
        },
        id="not-json",
    ),
    pytest.param(
        b'{"op_id": "\xff\xfe"}',
        None,
        {"code": "malformed", "message": "the payload is not UTF-8"},
        id="not-utf8",
    ),
    pytest.param(
        json.dumps([sync_op("arr-1")]).encode(),
        None,
        {"code": "malformed", "message": "the payload is not a JSON object"},
        id="array",
    ),
    pytest.param(
        b"12345",
        None,
        {"code": "malformed", "message": "the payload is not a JSON object"},
        id="number",
    ),
    pytest.param(
        b"x" * (10 * 1024 * 1024),
        None,
        {"code": "too_large", "message": "payload is 10485760 bytes, over the limit of 262144"},
        id="10MB",
    ),
    pytest.param(
        DEEP_ARRAY,
        None,
        {"code": "malformed", "message": "the payload is not a JSON object"},
        id="deep-nesting",
    ),
    pytest.param(
        json.dumps({**sync_op("wt-1"), "entity_id": 17}).encode(),
        "wt-1",
        {"code": "schema", "message": "Expected `str`, got `int`", "path": "entity_id"},
        id="wrong-type",
    ),
    pytest.param(
        json.dumps(sync_op("wt-2", base_version="7")).encode(),
        "wt-2",
        {
            "code": "schema",
            "message": "Expected `int | null`, got `str`",
            "path": "base_version",
        },
        id="wrong-type-version",
    ),
    pytest.param(
        json.dumps({"batch_id": "b", "ops": "all of them"}).encode(),
        None,
        {"code": "schema", "message": "ops must be a list of operations", "path": "ops"},
        id="ops-not-a-list",
    ),
    # Too deep to be read at all: its op_id cannot be read either.
    pytest.param(
        _deep_in_change(),
        None,
        {"code": "malformed", "message": "the JSON is nested too deeply"},
        id="deep-in-change",
    ),
]


@pytest.mark.parametrize(("payload", "op_id", "error"), REFUSED)
def test_refused_payload_is_answered_and_quarantined(
    daemon: Daemon, client: Client, payload: bytes, op_id: str | None, error: dict[str, str]
) -> None:
    client.subscribe(ack_topic(daemon.root))
    client.publish(sync_topic(daemon.root), payload)
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": op_id, "status": "rejected", "error": error}],
    }
    assert quarantined(daemon) == [
        (
            sync_topic(daemon.root),
            "d1",
            "sync",
            error["code"],
            error.get("path"),
            payload[:MAX_PAYLOAD],
            len(payload),
        )
    ]
    assert stored_ops(daemon) == []
    assert_still_serving(daemon, client)


def test_one_bad_op_in_a_batch_is_refused_alone(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root))
    payload = _with_bad_op()
    client.publish(sync_topic(daemon.root), payload)
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": "mixed",
        "results": [
            stored("m1", 1),
            {
                "op_id": "m2",
                "status": "rejected",
                "error": {
                    "code": "schema",
                    "message": "an update changes at least one field",
                    "path": "ops[1].changes",
                },
            },
            stored("m3", 2),
        ],
    }
    raw_bad = json.dumps(sync_op("m2", changes={})).encode()
    assert quarantined(daemon) == [
        (sync_topic(daemon.root), "d1", "sync", "schema", "ops[1].changes", raw_bad, len(raw_bad))
    ]
    assert [row[0] for row in stored_ops(daemon)] == ["m1", "m3"]


def test_device_metadata_is_stored(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon.root))
    meta = {"platform": "android", "app_version": "3.2.1", "network": "offline"}
    client.publish(sync_topic(daemon.root), sync_op("meta-1", device=meta))
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "meta-1", "status": "stored", "version": 1}],
    }
    ((meta_json,),) = db_rows(daemon.db_url, "select device_meta from sync_log")
    assert json.loads(meta_json) == meta


def test_refusals_and_valid_ops_in_one_stream(daemon: Daemon, client: Client) -> None:
    """Bad payloads between good ones refuse themselves alone; the good ones are stored."""
    client.subscribe(ack_topic(daemon.root))
    bad = [b"{", b"[]", json.dumps(sync_op("bad-x", entity_type="invoice")).encode()]
    for index in range(9):
        client.publish(sync_topic(daemon.root), sync_op(f"g{index}", entity_id="t1"), wait=False)
        if index % 3 == 2:
            client.publish(sync_topic(daemon.root), bad[index // 3], wait=False)
    results = expect_results(client, 12)
    by_op: dict[str | None, list[dict[str, Any]]] = {}
    for result in results:
        by_op.setdefault(result["op_id"], []).append(result)
    for index in range(9):
        assert by_op[f"g{index}"] == [
            {"op_id": f"g{index}", "status": "stored", "version": index + 1}
        ]
    assert sorted(by_op[None], key=lambda r: r["error"]["message"]) == [
        {
            "op_id": None,
            "status": "rejected",
            "error": {"code": "malformed", "message": "not valid JSON: Input data was truncated"},
        },
        {
            "op_id": None,
            "status": "rejected",
            "error": {"code": "malformed", "message": "the payload is not a JSON object"},
        },
    ]
    assert by_op["bad-x"] == [
        {
            "op_id": "bad-x",
            "status": "rejected",
            "error": {
                "code": "unknown_entity_type",
                "message": "unknown entity type 'invoice'",
                "path": "entity_type",
            },
        }
    ]
    assert set(by_op) == {None, "bad-x", *(f"g{index}" for index in range(9))}
    assert sorted(row[3] for row in quarantined(daemon)) == [
        "malformed",
        "malformed",
        "unknown_entity_type",
    ]
    assert [(row[0], row[4]) for row in stored_ops(daemon)] == [
        (f"g{index}", index + 1) for index in range(9)
    ]
    assert sync_fence(client, daemon.root) == []


def test_payloads_committed_together_share_one_ack_per_device(
    daemon: Daemon, client: Client
) -> None:
    """One ack message per device per commit (PROTOCOL.md): `{"batch_ids", "results"}`
    for several payloads, `batch_ids` the batches' ids only, results in arrival order;
    `{"batch_id", "results"}` for a device with one payload in the commit; a payload
    with a v5 response topic answered there alone.

    The commit is made deterministic: the test holds SQLite's write lock while a
    first payload's commit waits on it, and the others gather behind it.

    Checked against: `batch_ids` listing every payload's batch_id (null included);
    one ack message per payload; the response-topic payload's results folded into
    its device's ack."""
    root = daemon.root
    reply = f"{root}/replies/coalesced"
    client.subscribe(*(ack_topic(root, d) for d in ("d0", "d1", "d2")), reply)
    admin = Admin(client, root)

    def queues() -> dict[str, int]:
        queued: dict[str, int] = admin.data("stats")["queues"]
        return queued

    lock = sqlite3.connect(sqlite_path(daemon.db_url), isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        client.publish(sync_topic(root, "d0"), sync_op("first", entity_id="e0"))
        # Taken into a commit that waits for the lock: held, and no longer pending.
        wait_for(lambda: (q := queues())["in_flight"] >= 1 and q["pending_commit"] == 0)
        client.publish(sync_topic(root, "d1"), {"batch_id": "b-a", "ops": [sync_op("a1")]})
        client.publish(sync_topic(root, "d2"), {"batch_id": "b-d", "ops": [sync_op("d1-op")]})
        client.publish(sync_topic(root, "d1"), sync_op("b1", entity_id="e1"))
        client.publish(sync_topic(root, "d1"), sync_op("r1", entity_id="e2"), response_topic=reply)
        client.publish(
            sync_topic(root, "d1"),
            {"batch_id": "b-c", "ops": [sync_op("c1"), sync_op("c2", entity_id="e1")]},
        )
        wait_for(lambda: queues()["pending_commit"] == 5)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: len(client.on(ack_topic(root, "d1"))) and len(client.on(reply)))
    assert [m.json() for m in client.on(ack_topic(root, "d0"))] == [
        {"batch_id": None, "results": [stored("first", 1)]}
    ]
    assert [m.json() for m in client.on(ack_topic(root, "d1"))] == [
        {
            "batch_ids": ["b-a", "b-c"],
            "results": [stored("a1", 1), stored("b1", 1), stored("c1", 3), stored("c2", 2)],
        }
    ]
    assert [m.json() for m in client.on(ack_topic(root, "d2"))] == [
        {"batch_id": "b-d", "results": [stored("d1-op", 2)]}
    ]
    assert [m.json() for m in client.on(reply)] == [
        {"batch_id": None, "results": [stored("r1", 1)]}
    ]


@pytest.mark.parametrize(
    "device", ["bad id", "semi;colon", "é", "d" * 65], ids=["space", "semicolon", "accent", "65"]
)
def test_a_topic_whose_device_id_breaks_the_pattern_is_refused(
    daemon: Daemon, client: Client, device: str
) -> None:
    """`device_id` is `[A-Za-z0-9_.-]{1,64}` (PROTOCOL.md, Conventions), the topic's too:
    the payload is rejected whole, answered on that topic's ack, quarantined with the
    device id cut to its column, and nothing is stored.

    Checked against: the handler without its device-id check (stored, `version` 1)."""
    client.subscribe(ack_topic(daemon.root, device))
    payload = json.dumps(sync_op("dev-1")).encode()
    client.publish(sync_topic(daemon.root, device), payload)
    (ack,) = client.expect(1)
    assert ack.topic == ack_topic(daemon.root, device)
    assert ack.json() == {
        "batch_id": None,
        "results": [
            {
                "op_id": None,
                "status": "rejected",
                "error": {
                    "code": "schema",
                    "message": "the device id in the topic is not [A-Za-z0-9_.-]{1,64}",
                },
            }
        ],
    }
    assert quarantined(daemon) == [
        (
            sync_topic(daemon.root, device),
            device[:64],
            "sync",
            "schema",
            None,
            payload,
            len(payload),
        )
    ]
    assert stored_ops(daemon) == []


RATE_MESSAGE = "the device is over its operation rate; retry later"
NO_REFILL = "0.001"
"""Operations a second: none comes back within a test (tests/test_rate_limit.py)."""


def rate_limited(op_id: str | None, path: str | None = None) -> dict[str, Any]:
    error = {"code": "rate_limited", "message": RATE_MESSAGE}
    if path is not None:
        error["path"] = path
    return {"op_id": op_id, "status": "rejected", "error": error}


def test_rate_limited_per_device(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Per device, answered and quarantined, counted as rejections; another device
    has its own bucket.

    Checked against: the limiter left out of the daemon's sync handler (all stored)."""
    daemon = make_daemon(broker.port, LIMITS__DEVICE_RATE=NO_REFILL, LIMITS__DEVICE_BURST="3")
    root = daemon.root
    client.subscribe(f"{root}/devices/d1/sync/ack", f"{root}/devices/d2/sync/ack")
    batch = {"batch_id": "b-5", "ops": [sync_op(f"a{i}", entity_id=f"e{i}") for i in range(5)]}
    client.publish(f"{root}/devices/d1/sync", batch)
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": "b-5",
        "results": [
            stored("a0", 1),
            stored("a1", 1),
            stored("a2", 1),
            rate_limited("a3", "ops[3]"),
            rate_limited("a4", "ops[4]"),
        ],
    }
    assert send_one(client, root, "d2", sync_op("b0")) == stored("b0", 1)
    assert send_one(client, root, "d1", sync_op("a5")) == rate_limited("a5")
    assert db_rows(daemon.db_url, "select op_id from sync_log order by id") == [
        ("a0",),
        ("a1",),
        ("a2",),
        ("b0",),
    ]
    assert db_rows(daemon.db_url, "select device_id, code, path from quarantine order by id") == [
        ("d1", "rate_limited", "ops[3]"),
        ("d1", "rate_limited", "ops[4]"),
        ("d1", "rate_limited", None),
    ]
    stats = Admin(client, root).data("stats")
    assert (stats["ops"], stats["rejected_by_code"]) == (
        {"stored": 4, "duplicate": 0, "rejected": 3},
        {"rate_limited": 3},
    )
