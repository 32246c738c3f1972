"""Conflicts (v2) end to end: the daemon process, a real broker, the admin commands.

Messages are asserted as received by a subscriber, fenced by a message that comes
after them; records as stored and as the admin commands return them.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conflict_oracle import expected_conflicts
from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    judged,
    stored_conflicts,
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
        self.lock = threading.Lock()

    def __call__(self, command: str, **args: Any) -> dict[str, Any]:
        with self.lock:
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

    def data(self, command: str, **args: Any) -> dict[str, Any]:
        answer = self(command, **args)
        assert answer["status"] == "ok", answer
        found: dict[str, Any] = answer["data"]
        return found

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


def send(client: Client, root: str, device: str, op: dict[str, Any]) -> None:
    client.publish(f"{root}/devices/{device}/sync", op)


def stored(daemon: Daemon, *op_ids: str) -> None:
    """Until these ops are committed and judged (detection runs after the ack), and with
    them every message they caused."""
    marks = ", ".join("?" * len(op_ids))

    def found() -> bool:
        with sqlite3.connect(sqlite_path(daemon)) as conn:
            query = f"select count(*) from sync_log where op_id in ({marks})"
            return bool(conn.execute(query, op_ids).fetchone()[0] == len(op_ids))

    wait_for(found, timeout=30)
    wait_for(lambda: judged(daemon.db_url), timeout=30)


def wait_stored(daemon: Daemon, count: int) -> None:
    """Until the sync log holds `count` operations (acks may be coalesced: count rows),
    all of them judged."""

    def stored() -> bool:
        with sqlite3.connect(sqlite_path(daemon)) as conn:
            return bool(conn.execute("select count(*) from sync_log").fetchone()[0] == count)

    wait_for(stored, timeout=30)
    wait_for(lambda: judged(daemon.db_url), timeout=30)


def title(value: str) -> dict[str, Any]:
    return {"title": {"old": "", "new": value}}


def fenced(client: Client, root: str) -> list[Any]:
    """Every conflict message up to a fence: a conflict on an entity of its own, committed
    after what came before (the caller waited for it: `stored`), so its detected message
    (to the operators' topic) is published after theirs."""
    fence = f"fence-{uuid.uuid4().hex[:6]}"
    send(client, root, "fence-1", sync_op(f"{fence}-a", entity_id=fence, changes=title("x")))
    send(client, root, "fence-2", sync_op(f"{fence}-b", entity_id=fence, changes=title("y")))
    out: list[Any] = []
    while True:
        (message,) = client.expect(1)
        entity_id = message.json()["conflict"]["entity_id"]
        if entity_id == fence and message.topic == f"{root}/conflicts":
            return out
        if not entity_id.startswith("fence-"):
            out.append(message)


def test_messages_and_the_admin_commands(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    client.subscribe(f"{root}/conflicts", f"{root}/devices/+/conflicts")
    send(client, root, "d1", sync_op("a", changes=title("x")))
    send(client, root, "d2", sync_op("b", operation="delete", changes={}, user_id="u2"))
    stored(daemon, "a", "b")
    notices = fenced(client, root)
    assert sorted(n.topic for n in notices) == sorted(
        [f"{root}/conflicts", f"{root}/devices/d1/conflicts", f"{root}/devices/d2/conflicts"]
    )
    payloads = [n.json() for n in notices]
    assert all(p == payloads[0] for p in payloads)
    assert payloads[0]["event"] == "conflict.detected"
    record = payloads[0]["conflict"]
    cid = record["conflict_id"]
    assert {k: v for k, v in record.items() if k not in ("detected_at", "updated_at")} == {
        "conflict_id": cid,
        "entity_type": "task",
        "entity_id": "t1",
        "status": "open",
        "severity": "critical",
        "strategy": "last_writer_wins",
        "fields": ["title"],
        "winners": {},
        "member_count": 2,
        "device_ids": ["d1", "d2"],
        "user_ids": ["u1", "u2"],
        "resolved_at": None,
        "resolved_by": None,
        "merged_into": None,
        "note": None,
        "members": [
            {
                "op_id": "b",
                "device_id": "d2",
                "user_id": "u2",
                "operation": "delete",
                "version": 2,
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "changes": {},
            },
            {
                "op_id": "a",
                "device_id": "d1",
                "user_id": "u1",
                "operation": "update",
                "version": 1,
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "changes": {"title": {"old": "", "new": "x"}},
            },
        ],
    }

    assert admin.data("conflicts/get", conflict_id=cid) == {"conflict": record, "next_cursor": None}
    summary = {k: v for k, v in record.items() if k != "members"}
    listed = admin.data("conflicts/list", status="open", entity_id="t1")
    assert listed == {"items": [summary], "next_cursor": None}
    assert admin.data("conflicts/list", status="resolved") == {"items": [], "next_cursor": None}

    def refused(path: str, **args: Any) -> str:
        answer = admin("conflicts/resolve", conflict_id=cid, by="ops-anna", **args)
        assert answer["status"] == "error", answer
        assert (answer["error"]["code"], answer["error"]["path"]) == ("invalid_args", path)
        message: str = answer["error"]["message"]
        return message

    assert "not a member" in refused("winner_op_id", winner_op_id="zzz")
    assert "not a member" in refused("winners.title", winners={"title": "zzz"})
    assert "not a field" in refused("winners.notes", winners={"notes": "a"})
    missing = admin("conflicts/get", conflict_id="nope")
    assert (missing["status"], missing["error"]["path"]) == ("error", "conflict_id")

    resolved = admin.data("conflicts/resolve", conflict_id=cid, winner_op_id="b", by="ops-anna")
    assert (resolved["status"], resolved["winners"], resolved["resolved_by"]) == (
        "resolved",
        {"title": "b"},
        "ops-anna",
    )
    assert resolved["resolved_at"].endswith("Z")
    unchanged = ("status", "winners", "resolved_at", "resolved_by", "updated_at")
    assert {k: v for k, v in resolved.items() if k not in unchanged} == {
        k: v for k, v in record.items() if k not in unchanged
    }
    notices = fenced(client, root)
    assert sorted(n.topic for n in notices) == sorted(
        [f"{root}/conflicts", f"{root}/devices/d1/conflicts", f"{root}/devices/d2/conflicts"]
    )
    assert all(n.json() == {"event": "conflict.resolved", "conflict": resolved} for n in notices)
    assert "resolved already" in refused("conflict_id", winner_op_id="a")
    assert admin.data("conflicts/get", conflict_id=cid)["conflict"] == resolved

    stats = admin.data("conflicts/stats", group_by="severity")
    assert (stats["conflicts"], stats["members"]) == (3, 6)  # with the two fences'
    assert [(g["key"], g["conflicts"], g["members"]) for g in stats["groups"]] == [
        ("low", 2, 4),
        ("critical", 1, 2),
    ]
    daemon_stats = admin.data("stats")
    assert (daemon_stats["conflicts"], daemon_stats["conflict_members"]) == (
        {"critical": 1, "low": 2},
        6,
    )
    assert daemon.terminate() == 0


def test_a_joining_member_is_announced_to_its_device_alone(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/conflicts", f"{root}/devices/+/conflicts")
    send(client, root, "d1", sync_op("a", changes=title("x")))
    send(client, root, "d2", sync_op("b", changes=title("y")))
    stored(daemon, "a", "b")
    (detected_to_ops,) = [n for n in fenced(client, root) if n.topic == f"{root}/conflicts"]
    cid = detected_to_ops.json()["conflict"]["conflict_id"]
    send(client, root, "d3", sync_op("c", changes=title("z")))
    stored(daemon, "c")
    notices = fenced(client, root)
    assert sorted(n.topic for n in notices) == [f"{root}/conflicts", f"{root}/devices/d3/conflicts"]
    body = notices[0].json()
    assert (body["event"], body["joined"], body["absorbed"]) == ("conflict.updated", ["c"], [])
    assert body["conflict"]["conflict_id"] == cid
    assert body["conflict"]["member_count"] == 3
    assert body["conflict"]["winners"] == {"title": "c"}
    assert daemon.terminate() == 0


def test_list_filters_and_pages(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    """Six conflicts: each filter finds exactly its own, pages of 4 cover them newest
    first with none twice.

    Checked against: a `device_id` filter that reads the first member only, and an
    `entity_id` filter ignored."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    client.subscribe(f"{root}/conflicts")
    plan = [
        ("e1", "task", "title", "dA", "dB"),
        ("e2", "task", "status", "dA", "dC"),
        ("e3", "asset", "notes", "dB", "dC"),
        ("e4", "asset", "location", "dD", "dE"),
        ("e5", "task", "title", "dD", "dA"),
        ("e6", "work_order", "priority", "dE", "dB"),
    ]
    for n, (entity, kind, field, first, second) in enumerate(plan):
        for device, value in ((first, "x"), (second, "y")):
            op = sync_op(
                f"{entity}-{device}",
                entity_id=entity,
                entity_type=kind,
                changes={field: {"old": None, "new": f"{value}{n}"}},
            )
            send(client, root, device, op)
        client.expect(1)
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = admin.data("conflicts/list", limit=4, **({"cursor": cursor} if cursor else {}))
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [r["entity_id"] for r in seen] == ["e6", "e5", "e4", "e3", "e2", "e1"]

    def entities(**filters: Any) -> list[str]:
        return [r["entity_id"] for r in admin.data("conflicts/list", **filters)["items"]]

    assert entities(device_id="dA") == ["e5", "e2", "e1"]
    assert entities(device_id="dE") == ["e6", "e4"]
    assert entities(entity_type="asset") == ["e4", "e3"]
    assert entities(entity_id="e3") == ["e3"]
    assert entities(severity="high") == ["e6", "e4", "e2"]
    assert entities(severity="low", entity_type="task") == ["e5", "e1"]
    assert entities(status="auto_resolved", device_id="dB") == ["e6", "e3", "e1"]
    bad = admin("conflicts/list", cursor="forged")
    assert (bad["status"], bad["error"]["path"]) == ("error", "cursor")
    assert daemon.terminate() == 0


def test_get_pages_through_the_members(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    for n in range(7):
        send(client, root, f"d{n}", sync_op(f"m{n}", changes=title(f"v{n}")))
    wait_stored(daemon, 7)
    (cid,) = [r["conflict_id"] for r in admin.data("conflicts/list")["items"]]
    seen: list[str] = []
    cursor = None
    while True:
        args: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = admin.data("conflicts/get", conflict_id=cid, **args)
        assert page["conflict"]["member_count"] == 7
        seen.extend(m["op_id"] for m in page["conflict"]["members"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"m{n}" for n in reversed(range(7))]
    assert daemon.terminate() == 0


def test_resolving_an_auto_resolved_conflict_and_two_at_once(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    """An operator may overrule an automatic resolution; of two operators resolving one
    conflict at once, one succeeds and the other is told it is resolved already.

    Checked against: the resolution refusing an `auto_resolved` conflict; an update
    not conditional on the status (both succeed)."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin, other = admin_for(daemon), admin_for(daemon)
    send(client, root, "d1", sync_op("a", changes=title("x")))
    send(client, root, "d2", sync_op("b", changes=title("y")))
    wait_stored(daemon, 2)
    (found,) = admin.data("conflicts/list")["items"]
    assert (found["status"], found["winners"]) == ("auto_resolved", {"title": "b"})
    answers: list[dict[str, Any]] = []

    def resolve(who: Admin, winner: str) -> None:
        answers.append(
            who(
                "conflicts/resolve",
                conflict_id=found["conflict_id"],
                winner_op_id=winner,
                by=winner,
            )
        )

    threads = [
        threading.Thread(target=resolve, args=(admin, "a")),
        threading.Thread(target=resolve, args=(other, "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(a["status"] for a in answers)
    assert statuses == ["error", "ok"], answers
    (won,) = [a["data"] for a in answers if a["status"] == "ok"]
    (lost,) = [a["error"] for a in answers if a["status"] == "error"]
    assert lost["path"] == "conflict_id" and "resolved already" in lost["message"]
    stored = admin.data("conflicts/get", conflict_id=found["conflict_id"])["conflict"]
    assert (stored["status"], stored["winners"], stored["resolved_by"]) == (
        "resolved",
        won["winners"],
        won["resolved_by"],
    )
    assert daemon.terminate() == 0


def test_a_reload_changes_the_rules_of_what_comes_next(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    admin_for: Callable[[Daemon], Admin],
) -> None:
    """`config/reload` with a manual strategy for tasks: the next conflict of a task
    stays open; one that existed before is settled again when it gains a member.

    Checked against: a reload that keeps the detector's old rules."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    admin = admin_for(daemon)
    send(client, root, "d1", sync_op("a", changes=title("x")))
    send(client, root, "d2", sync_op("b", changes=title("y")))
    wait_stored(daemon, 2)
    daemon.config_path.write_text('[conflicts.types.task]\nstrategy = "manual"\n')
    assert admin.data("config/reload")["reloaded"] is True
    send(client, root, "d1", sync_op("c", entity_id="t2", changes=title("x")))
    send(client, root, "d2", sync_op("d", entity_id="t2", changes=title("y")))
    send(client, root, "d3", sync_op("e", changes=title("z")))
    wait_stored(daemon, 5)
    statuses = {
        r["entity_id"]: (r["status"], r["strategy"], r["winners"])
        for r in admin.data("conflicts/list")["items"]
    }
    assert statuses == {"t1": ("open", "manual", {}), "t2": ("open", "manual", {})}
    assert daemon.terminate() == 0


def test_late_arrival_meets_its_own_time_across_a_restart(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """An op published two hours after its edited_at joins the ops of that time, not
    those of now; a restart comes in between (detection's state is in the database)."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    client.subscribe(f"{root}/conflicts")
    now = datetime.now(UTC)
    then = now - timedelta(hours=2)
    send(client, root, "d1", sync_op("old-1", edited_at=iso(then), changes=title("morning")))
    wait_stored(daemon, 1)
    for n in range(3):
        send(client, root, "d1", sync_op(f"new-{n}", edited_at=iso(now), changes=title(f"n{n}")))
    wait_stored(daemon, 4)
    assert daemon.terminate() == 0
    daemon.start()
    late_at = iso(then + timedelta(seconds=90))
    send(client, root, "d2", sync_op("late-1", edited_at=late_at, changes=title("late")))
    stored(daemon, "late-1")
    (notice,) = fenced(client, root)
    assert [m["op_id"] for m in notice.json()["conflict"]["members"]] == ["late-1", "old-1"]
    assert [e.members for e in stored_conflicts(daemon.db_url) if "fence" not in e.members[0]] == [
        ("late-1", "old-1")
    ]


def test_restart_in_the_middle_changes_nothing(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """One generated example of the property test, through the daemon and a restart."""
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
    found = stored_conflicts(daemon.db_url)
    assert len(found) == len(set(found))
    assert set(found) == expected
    assert len(expected) >= 2, "the example should hold conflicts"
