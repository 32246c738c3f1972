"""Conflicts end to end: the daemon process, a real broker, the admin commands.

Notices are asserted as received by a subscriber; records as stored and as the
admin commands return them; no assertion depends on timing.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conflict_oracle import expected_conflicts
from tests.support import (
    CONFLICT_ROWS,
    Client,
    Daemon,
    Mosquitto,
    records_from_rows,
    sync_op,
    wait_for,
)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Admin:
    """Admin requests over MQTT v5 with a private response topic."""

    def __init__(self, port: int, root: str) -> None:
        self.root = root
        self.reply = f"test/reply/{uuid.uuid4().hex[:8]}"
        self.client = Client(port).connect().subscribe(self.reply)

    def __call__(self, command: str, **args: Any) -> dict[str, Any]:
        transaction = uuid.uuid4().hex
        self.client.publish(
            f"{self.root}/admin/request/{command}",
            {"transaction": transaction, **args},
            response_topic=self.reply,
        )
        while True:
            (message,) = self.client.expect(1)
            body: dict[str, Any] = message.json()
            if body.get("transaction") == transaction and body.get("status") != "accepted":
                return body

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def admin_for(broker: Mosquitto) -> Iterator[Callable[[Daemon], Admin]]:
    made: list[Admin] = []

    def make(daemon: Daemon) -> Admin:
        admin = Admin(broker.port, daemon.root)
        made.append(admin)
        return admin

    yield make
    for admin in made:
        admin.close()


def sqlite_path(daemon: Daemon) -> str:
    return daemon.db_url.split("///", 1)[1]


def stored_conflicts(daemon: Daemon) -> list[tuple[str, str]]:
    with sqlite3.connect(sqlite_path(daemon)) as conn:
        return list(conn.execute("select op_a, op_b from conflicts order by id"))


def send(client: Client, root: str, device: str, op: dict[str, Any]) -> None:
    client.publish(f"{root}/devices/{device}/sync", op)


def wait_stored(daemon: Daemon, count: int) -> None:
    """Until the sync log holds `count` operations (acks may be coalesced: count rows)."""

    def stored() -> bool:
        with sqlite3.connect(sqlite_path(daemon)) as conn:
            return bool(conn.execute("select count(*) from sync_log").fetchone()[0] == count)

    wait_for(stored, timeout=30)


def test_notices_and_the_admin_commands(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    client.subscribe(f"{root}/conflicts", f"{root}/devices/+/conflicts")
    send(client, root, "d1", sync_op("a", changes={"title": {"old": "", "new": "x"}}))
    send(client, root, "d2", sync_op("b", operation="delete", changes={}, user_id="u2"))
    notices = client.expect(3)
    assert sorted(n.topic for n in notices) == sorted(
        [f"{root}/conflicts", f"{root}/devices/d1/conflicts", f"{root}/devices/d2/conflicts"]
    )
    payloads = [n.json() for n in notices]
    assert all(p == payloads[0] for p in payloads)
    event = payloads[0]
    assert event["event"] == "conflict.detected"
    record = event["conflict"]
    assert {k: v for k, v in record.items() if k not in ("conflict_id", "detected_at")} == {
        "entity_type": "task",
        "entity_id": "t1",
        "op_ids": ["a", "b"],
        "device_ids": ["d1", "d2"],
        "user_ids": ["u1", "u2"],
        "fields": ["title"],
        "values": {"title": {"a": {"old": "", "new": "x"}, "b": {"old": None, "new": None}}},
        "severity": "critical",
        "strategy": "last_writer_wins",
        "status": "open",
        "winner_op_id": None,
        "resolved_at": None,
        "resolved_by": None,
    }
    cid = record["conflict_id"]

    got = admin("conflicts/get", conflict_id=cid)
    assert got["status"] == "ok" and got["data"] == record
    listed = admin("conflicts/list", status="open")
    assert listed["data"] == {"items": [record], "next_cursor": None}
    assert admin("conflicts/list", status="resolved")["data"] == {"items": [], "next_cursor": None}

    wrong = admin("conflicts/resolve", conflict_id=cid, winner_op_id="zzz", by="ops-anna")
    assert wrong["status"] == "error"
    assert wrong["error"]["code"] == "invalid_args"
    assert wrong["error"]["path"] == "winner_op_id"
    missing = admin("conflicts/get", conflict_id="nope")
    assert missing["status"] == "error" and missing["error"]["code"] == "invalid_args"

    done = admin("conflicts/resolve", conflict_id=cid, winner_op_id="b", by="ops-anna")
    assert done["status"] == "ok"
    resolved = done["data"]
    assert resolved["status"] == "resolved"
    assert resolved["winner_op_id"] == "b"
    assert resolved["resolved_by"] == "ops-anna"
    assert resolved["resolved_at"].endswith("Z")
    assert {
        k: v for k, v in resolved.items() if not k.startswith(("resolved", "status", "win"))
    } == {k: v for k, v in record.items() if not k.startswith(("resolved", "status", "win"))}
    notices = client.expect(3)
    assert sorted(n.topic for n in notices) == sorted(
        [f"{root}/conflicts", f"{root}/devices/d1/conflicts", f"{root}/devices/d2/conflicts"]
    )
    assert all(n.json() == {"event": "conflict.resolved", "conflict": resolved} for n in notices)

    again = admin("conflicts/resolve", conflict_id=cid, winner_op_id="a", by="ops-ben")
    assert again["status"] == "error" and again["error"]["code"] == "invalid_args"
    assert "not open" in again["error"]["message"]
    assert admin("conflicts/get", conflict_id=cid)["data"] == resolved

    stats = admin("conflicts/stats", group_by="severity")["data"]
    assert stats["total"] == 1
    assert [(g["key"], g["count"]) for g in stats["groups"]] == [("critical", 1)]
    by_user = admin("conflicts/stats", group_by="user_id")["data"]
    assert {g["key"]: (g["count"], g["ops_total"]) for g in by_user["groups"]} == {
        "u1": (1, 1),
        "u2": (1, 1),
    }
    hours = admin("conflicts/stats", group_by="hour", since="2000-01-01T00:00:00Z")["data"]
    assert sum(g["count"] for g in hours["groups"]) == 1
    assert admin("stats")["data"]["conflicts"] == {"critical": 1}
    assert client.quiet(0.3) == []
    assert daemon.terminate() == 0


def test_list_pages_newest_first(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    client.subscribe(f"{root}/conflicts")
    for n in range(5):
        change = {"title": {"old": "", "new": f"v{n}"}}
        send(client, root, f"d{n}", sync_op(f"op{n}", entity_id="hot", changes=change))
    # Five devices on one field: ten pairs.
    client.expect(10)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = admin("conflicts/list", limit=3, **({"cursor": cursor} if cursor else {}))["data"]
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 10
    stored = stored_conflicts(daemon)
    assert [tuple(r["op_ids"]) for r in seen] == list(reversed(stored))
    bad = admin("conflicts/list", cursor="forged")
    assert bad["status"] == "error" and bad["error"]["path"] == "cursor"
    low = admin("conflicts/list", severity="low", entity_type="task", limit=1000)["data"]
    assert len(low["items"]) == 10
    assert admin("conflicts/list", entity_type="asset")["data"]["items"] == []


def test_late_arrival_conflicts_with_its_own_time_across_a_restart(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """An op published two hours after its edited_at meets the ops of that time.

    Recent traffic and a restart (which warms the window cache, turned on here,
    with recent ops only) come in between, so the late op is answered from the
    database.
    """
    daemon = make_daemon(broker.port, CONFLICTS__CACHE_MAX_OPS="5000")
    root = daemon.root
    client.subscribe(f"{root}/conflicts")
    now = datetime.now(UTC)
    then = now - timedelta(hours=2)
    title = {"title": {"old": "", "new": "morning"}}
    send(client, root, "d1", sync_op("old-1", edited_at=iso(then), changes=title))
    wait_stored(daemon, 1)
    for n in range(3):
        recent = {"title": {"old": "", "new": f"now{n}"}}
        send(client, root, "d1", sync_op(f"new-{n}", edited_at=iso(now), changes=recent))
    wait_stored(daemon, 4)
    assert daemon.terminate() == 0
    daemon.start()
    late = {"title": {"old": "", "new": "late"}}
    late_at = iso(then + timedelta(seconds=90))
    send(client, root, "d2", sync_op("late-1", edited_at=late_at, changes=late))
    (notice,) = client.expect(1)
    assert notice.json()["conflict"]["op_ids"] == ["late-1", "old-1"]
    assert client.quiet(0.5) == []
    assert stored_conflicts(daemon) == [("late-1", "old-1")]


def test_restart_in_the_middle_changes_nothing(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """One generated example of the property test, through the daemon and a restart."""
    import random

    rng = random.Random(7)
    daemon = make_daemon(broker.port)
    root = daemon.root
    base = datetime.now(UTC) - timedelta(minutes=30)
    ops: list[tuple[str, dict[str, Any]]] = []
    for n in range(40):
        device = f"d{rng.randrange(4)}"
        field = rng.choice(["status", "title", "notes"])
        op = sync_op(
            f"op{n}",
            entity_id=rng.choice(["e1", "e2"]),
            changes={field: {"old": None, "new": rng.choice(["a", "b", "c"])}},
            edited_at=iso(base + timedelta(seconds=rng.choice([0, 200, 300, 301, 600]))),
        )
        ops.append((device, op))
    stream = ops[:25] + ops[5:10]  # with redeliveries
    for device, op in stream:
        send(client, root, device, op)
    wait_stored(daemon, 25)
    assert daemon.terminate() == 0
    daemon.start()
    rest = ops[25:] + ops[:3] + ops[30:33]
    for device, op in rest:
        send(client, root, device, op)
    wait_stored(daemon, 40)
    expected = expected_conflicts([(op, device) for device, op in ops])
    with sqlite3.connect(sqlite_path(daemon)) as conn:
        found = records_from_rows(conn.execute(CONFLICT_ROWS).fetchall())
    assert len(found) == len(set(found))
    assert set(found) == expected
    assert expected, "the example should hold conflicts"
