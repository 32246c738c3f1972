"""Ingest end to end: a daemon process, the session broker, a device, its acks and rows.

Acks may coalesce several payloads of one device that were committed together
(`{"batch_ids": [...], "results": [...]}`), so where more than one payload is in
flight the tests match results by op_id, as a device does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    db_rows,
    expect_results,
    sync_op,
)

MAX_PAYLOAD = 256 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def us(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment - EPOCH) // timedelta(microseconds=1)


@pytest.fixture
def daemon(broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(broker.port)


def sync_topic(daemon: Daemon, device: str = "d1") -> str:
    return f"{daemon.root}/devices/{device}/sync"


def ack_topic(daemon: Daemon, device: str = "d1") -> str:
    return f"{daemon.root}/devices/{device}/sync/ack"


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
    client.publish(sync_topic(daemon), sync_op(op_id, entity_id="after"))
    (ack,) = client.expect(1, timeout=15)
    assert ack.topic == ack_topic(daemon)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": op_id, "status": "stored", "version": 1}],
    }
    assert db_rows(
        daemon.db_url, f"select op_id, version from sync_log where op_id = '{op_id}'"
    ) == [(op_id, 1)]


# -- one op, one batch -------------------------------------------------------


def test_single_op_is_stored_with_every_field(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon, "van-7"))
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
    client.publish(sync_topic(daemon, "van-7"), op)
    (ack,) = client.expect(1)
    assert ack.topic == ack_topic(daemon, "van-7")
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
    client.subscribe(ack_topic(daemon))
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
    client.publish(sync_topic(daemon), batch)
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
    assert client.quiet(0.5) == []


def test_many_payloads_of_one_device_match_by_op_id(daemon: Daemon, client: Client) -> None:
    """Sent back to back, they may share ack messages; every op gets one result, in order."""
    client.subscribe(ack_topic(daemon))
    for index in range(60):
        client.publish(sync_topic(daemon), sync_op(f"s{index:02d}", entity_id="t1"), wait=False)
    results = expect_results(client, 60)
    assert sorted(results, key=lambda r: r["op_id"]) == [
        {"op_id": f"s{index:02d}", "status": "stored", "version": index + 1} for index in range(60)
    ]
    assert client.quiet(0.5) == []
    assert [row[0] for row in stored_ops(daemon)] == [f"s{index:02d}" for index in range(60)]


# -- where the answer goes ---------------------------------------------------


def test_v5_response_topic_gets_the_answer_with_correlation(daemon: Daemon, client: Client) -> None:
    reply_a = f"{daemon.root}/replies/a"
    reply_b = f"{daemon.root}/replies/b"
    client.subscribe(ack_topic(daemon), reply_a, reply_b)
    client.publish(
        sync_topic(daemon), sync_op("r1"), response_topic=reply_a, correlation=b"\x00corr-1"
    )
    client.publish(
        sync_topic(daemon),
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
    # The answer goes there, and only there.
    assert client.quiet(1.0) == []


def test_v5_response_topic_gets_rejections_too(daemon: Daemon, client: Client) -> None:
    reply = f"{daemon.root}/replies/x"
    client.subscribe(ack_topic(daemon), reply)
    client.publish(sync_topic(daemon), b"{nope", response_topic=reply, correlation=b"c-9")
    (answer,) = client.expect(1)
    assert (answer.topic, answer.correlation) == (reply, b"c-9")
    body = answer.json()
    assert body["batch_id"] is None
    (result,) = body["results"]
    assert (result["op_id"], result["status"], result["error"]["code"]) == (
        None,
        "rejected",
        "malformed",
    )
    assert client.quiet(0.5) == []


def test_v311_client_is_answered_on_the_ack_topic(broker: Mosquitto, daemon: Daemon) -> None:
    old = Client(broker.port, v5=False).connect()
    try:
        old.subscribe(ack_topic(daemon, "legacy-1"))
        old.publish(sync_topic(daemon, "legacy-1"), sync_op("v3-1"))
        (ack,) = old.expect(1)
        assert ack.topic == ack_topic(daemon, "legacy-1")
        assert ack.json() == {
            "batch_id": None,
            "results": [{"op_id": "v3-1", "status": "stored", "version": 1}],
        }
    finally:
        old.close()
    assert stored_ops(daemon) == [("v3-1", "legacy-1", "task", "t1", 1)]


def test_answers_go_to_the_device_that_sent(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon, "d1"), ack_topic(daemon, "d2"))
    client.publish(sync_topic(daemon, "d1"), sync_op("from-d1", entity_id="shared"))
    client.publish(sync_topic(daemon, "d2"), sync_op("from-d2", entity_id="shared"))
    acks = {m.topic: m.json() for m in client.expect(2)}
    assert acks == {
        ack_topic(daemon, "d1"): {
            "batch_id": None,
            "results": [{"op_id": "from-d1", "status": "stored", "version": 1}],
        },
        ack_topic(daemon, "d2"): {
            "batch_id": None,
            "results": [{"op_id": "from-d2", "status": "stored", "version": 2}],
        },
    }


# -- exactly once ------------------------------------------------------------


def test_the_same_ops_twice_are_stored_once(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon))
    batch = {
        "batch_id": "b-1",
        "ops": [
            sync_op("e1", entity_id="t1"),
            sync_op("e2", entity_id="t1"),
            sync_op("e3", entity_id="t2"),
        ],
    }
    client.publish(sync_topic(daemon), batch)
    (first,) = client.expect(1)
    assert first.json() == {
        "batch_id": "b-1",
        "results": [
            {"op_id": "e1", "status": "stored", "version": 1},
            {"op_id": "e2", "status": "stored", "version": 2},
            {"op_id": "e3", "status": "stored", "version": 1},
        ],
    }
    client.publish(sync_topic(daemon), batch)
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
    client.subscribe(ack_topic(daemon, "d2"))
    client.publish(sync_topic(daemon, "d2"), sync_op("e2", entity_id="t1"))
    (third,) = client.expect(1)
    assert third.topic == ack_topic(daemon, "d2")
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
    client.subscribe(ack_topic(daemon))
    client.publish(
        sync_topic(daemon),
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
        client.publish(sync_topic(daemon), sync_op("w3"), wait=False)
    results = expect_results(client, 5)
    assert sorted(r["status"] for r in results) == ["duplicate"] * 4 + ["stored"]
    assert {(r["op_id"], r["version"]) for r in results} == {("w3", 3)}
    assert client.quiet(0.5) == []
    assert [(row[0], row[4]) for row in stored_ops(daemon)] == [("w1", 1), ("w2", 2), ("w3", 3)]


# -- what is refused ---------------------------------------------------------

DEPTH = 100_000
DEEP_ARRAY = b"[" * DEPTH + b"]" * DEPTH


def _deep_in_change() -> bytes:
    return json.dumps(sync_op("deep-1")).encode().replace(b'"done"', DEEP_ARRAY)


def _with_bad_op() -> bytes:
    return json.dumps(
        {"batch_id": "mixed", "ops": [sync_op("m1"), sync_op("m2", changes={}), sync_op("m3")]}
    ).encode()


# payload, code, path, op_id (None: the payload as a whole)
REFUSED: list[Any] = [
    pytest.param(b"this is not json", "malformed", None, None, id="not-json"),
    pytest.param(b'{"op_id": "\xff\xfe"}', "malformed", None, None, id="not-utf8"),
    pytest.param(json.dumps([sync_op("arr-1")]).encode(), "malformed", None, None, id="array"),
    pytest.param(b"12345", "malformed", None, None, id="number"),
    pytest.param(b"x" * (10 * 1024 * 1024), "too_large", None, None, id="10MB"),
    pytest.param(DEEP_ARRAY, "malformed", None, None, id="deep-nesting"),
    pytest.param(
        json.dumps({**sync_op("wt-1"), "entity_id": 17}).encode(),
        "schema",
        "entity_id",
        "wt-1",
        id="wrong-type",
    ),
    pytest.param(
        json.dumps(sync_op("wt-2", base_version="7")).encode(),
        "schema",
        "base_version",
        "wt-2",
        id="wrong-type-version",
    ),
    pytest.param(
        json.dumps({"batch_id": "b", "ops": "all of them"}).encode(),
        "schema",
        "ops",
        None,
        id="ops-not-a-list",
    ),
    pytest.param(_deep_in_change(), "malformed", None, "deep-1", id="deep-in-change"),
]


@pytest.mark.parametrize(("payload", "code", "path", "op_id"), REFUSED)
def test_refused_payload_is_answered_and_quarantined(
    daemon: Daemon,
    client: Client,
    payload: bytes,
    code: str,
    path: str | None,
    op_id: str | None,
) -> None:
    client.subscribe(ack_topic(daemon))
    client.publish(sync_topic(daemon), payload)
    (ack,) = client.expect(1)
    body = ack.json()
    assert set(body) == {"batch_id", "results"}
    (result,) = body["results"]
    assert result["status"] == "rejected"
    assert "version" not in result
    if op_id == "deep-1":  # deep nesting may be reported as schema or malformed
        assert result["error"]["code"] in {"malformed", "schema"}
        code, path = result["error"]["code"], result["error"].get("path")
        op_id = result["op_id"]
    assert result["op_id"] == op_id
    assert result["error"]["code"] == code
    assert result["error"].get("path") == path
    assert result["error"]["message"]
    assert quarantined(daemon) == [
        (sync_topic(daemon), "d1", "sync", code, path, payload[:MAX_PAYLOAD], len(payload))
    ]
    assert stored_ops(daemon) == []
    assert_still_serving(daemon, client)


def test_one_bad_op_in_a_batch_is_refused_alone(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon))
    payload = _with_bad_op()
    client.publish(sync_topic(daemon), payload)
    (ack,) = client.expect(1)
    body = ack.json()
    assert body["batch_id"] == "mixed"
    assert [r["op_id"] for r in body["results"]] == ["m1", "m2", "m3"]
    assert body["results"][0] == {"op_id": "m1", "status": "stored", "version": 1}
    assert body["results"][2] == {"op_id": "m3", "status": "stored", "version": 2}
    bad = body["results"][1]
    assert (bad["status"], bad["error"]["code"], bad["error"]["path"]) == (
        "rejected",
        "schema",
        "ops[1].changes",
    )
    raw_bad = json.dumps(sync_op("m2", changes={})).encode()
    assert quarantined(daemon) == [
        (sync_topic(daemon), "d1", "sync", "schema", "ops[1].changes", raw_bad, len(raw_bad))
    ]
    assert [row[0] for row in stored_ops(daemon)] == ["m1", "m3"]


def test_device_metadata_is_stored(daemon: Daemon, client: Client) -> None:
    client.subscribe(ack_topic(daemon))
    meta = {"platform": "android", "app_version": "3.2.1", "network": "offline"}
    client.publish(sync_topic(daemon), sync_op("meta-1", device=meta))
    (ack,) = client.expect(1)
    assert ack.json() == {
        "batch_id": None,
        "results": [{"op_id": "meta-1", "status": "stored", "version": 1}],
    }
    ((stored,),) = db_rows(daemon.db_url, "select device_meta from sync_log")
    assert json.loads(stored) == meta


def test_refusals_and_valid_ops_in_one_stream(daemon: Daemon, client: Client) -> None:
    """Bad payloads between good ones refuse themselves alone; the good ones are stored."""
    client.subscribe(ack_topic(daemon))
    bad = [b"{", b"[]", json.dumps(sync_op("bad-x", entity_type="invoice")).encode()]
    for index in range(9):
        client.publish(sync_topic(daemon), sync_op(f"g{index}", entity_id="t1"), wait=False)
        if index % 3 == 2:
            client.publish(sync_topic(daemon), bad[index // 3], wait=False)
    results = expect_results(client, 12)
    by_op: dict[str | None, list[dict[str, Any]]] = {}
    for result in results:
        by_op.setdefault(result["op_id"], []).append(result)
    for index in range(9):
        assert by_op[f"g{index}"] == [
            {"op_id": f"g{index}", "status": "stored", "version": index + 1}
        ]
    assert sorted(r["error"]["code"] for r in by_op[None]) == ["malformed", "malformed"]
    ((unknown,),) = [by_op["bad-x"]]
    assert (unknown["status"], unknown["error"]["code"], unknown["error"]["path"]) == (
        "rejected",
        "unknown_entity_type",
        "entity_type",
    )
    assert sorted(row[3] for row in quarantined(daemon)) == [
        "malformed",
        "malformed",
        "unknown_entity_type",
    ]
    assert [(row[0], row[4]) for row in stored_ops(daemon)] == [
        (f"g{index}", index + 1) for index in range(9)
    ]
    assert client.quiet(0.5) == []
