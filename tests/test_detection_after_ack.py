"""Conflict detection after the ack (storage/detection.py): what waits survives the
process, a pass judges at most what it may and the next goes on, the commit's mode
judges what waited first, and the real daemon judges at its start what a dead one
left, and says so on MQTT.

Each is held against detection in the commit on a database of its own: the same
operations must make the same conflicts, member for member.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import ConflictsConfig
from gateway.ingest.following import QUIET_S, Follower
from storage import conflict_store, migrate
from storage.detection import DetectionPass, judged_in
from storage.writer import WriteSet
from tests.conflict_harness import Store
from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    judged,
    send_one,
    stored_conflicts,
    sync_op,
    wait_for,
)

AT = "2026-11-29T12:00:{:02d}Z"


def edits(entities: int, per_entity: int) -> list[tuple[str, dict[str, Any]]]:
    """Edits of `status` by three devices, each entity's within seconds: every one
    collides with the other devices' edits of its entity."""
    out = []
    for n in range(per_entity):
        for e in range(entities):
            device = f"d{n % 3}"
            op = sync_op(
                f"op-{e}-{n}",
                entity_id=f"wo-{e}",
                changes={"status": {"old": "open", "new": f"s{n}"}},
                edited_at=AT.format(n),
            )
            out.append((device, op))
    return out


def shape(records: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {
        (r["entity_id"], tuple(r["member_ids"]), r["severity"], r["status"], tuple(r["fields"]))
        for r in records
    }


async def stored_only(store: Store, sends: list[tuple[str, dict[str, Any]]]) -> None:
    """Commit without the passes an idle engine would run next: a process that died
    right after its acks."""
    batch = WriteSet()
    for device, op in sends:
        batch.records.extend(store.decode(device, [op]))
    await store.writer.commit(batch)


async def waiting(store: Store) -> int:
    async with store.engine.connect() as conn:
        return await conflict_store.waiting(conn)


async def in_commit(url: str, sends: list[tuple[str, dict[str, Any]]]) -> set[tuple[Any, ...]]:
    store = await Store(url, detect="in_commit").start()
    try:
        for device, op in sends:
            await store.commit((device, [op]))
        return shape(await store.conflicts())
    finally:
        await store.close()


async def test_what_waits_when_the_process_dies_is_judged_by_the_next(
    db_url: str, tmp_path: Path
) -> None:
    sends = edits(4, 6)
    first = await Store(db_url).start()
    try:
        for part in range(0, len(sends), 5):
            await stored_only(first, sends[part : part + 5])
        assert await waiting(first) == len(sends)
        assert await first.conflicts() == []
        assert await first.notices() == []
    finally:
        await first.close()
    second = await Store(db_url).start()
    try:
        await second.detect()
        assert await waiting(second) == 0
        found = shape(await second.conflicts())
        messages = [n for n in await second.notices() if n["channel"] == "mqtt"]
    finally:
        await second.close()
    assert found == await in_commit(f"sqlite+aiosqlite:///{tmp_path}/ref.db", sends)
    assert len(found) == 4
    # one pass judged it all: one conflict.detected per conflict, to the operators and
    # the three devices
    assert len(messages) == 4 * (1 + 3)


async def test_a_pass_judges_at_most_its_share_and_the_next_goes_on(
    db_url: str, tmp_path: Path
) -> None:
    sends = edits(3, 10)
    store = await Store(db_url).start()
    try:
        await stored_only(store, sends)
        judged = []
        while await waiting(store):
            written = await store.writer.commit(WriteSet([DetectionPass(7)]))
            judged.append(written.events["detection"][0]["count"])
        found = shape(await store.conflicts(merged=False))
    finally:
        await store.close()
    assert judged == [7, 7, 7, 7, 2]
    assert found == await in_commit(f"sqlite+aiosqlite:///{tmp_path}/ref.db", sends)


async def test_while_devices_send_a_pass_keeps_to_its_budget_and_once_quiet_takes_all(
    db_url: str, tmp_path: Path
) -> None:
    """A batch that arrives during a pass waits for it: while batches come, a pass
    judges what fits in `pass_budget_ms` (at the rate passes were seen to judge; 20,000
    a second before any was timed), and after a second without a batch, up to
    `pass_max_ops`. Checked against: `_size` without the budget (one pass of 300)."""
    sends = edits(30, 10)
    store = await Store(db_url).start()
    config = ConflictsConfig(pass_max_ops=5000, pass_budget_ms=5)
    follower = Follower(store.writer, lambda: config, lambda *_: None, store.engine)
    try:
        await stored_only(store, sends)
        follower.committed(3)
        first = judged_in((await follower.run()).events["detection"])
        more = follower.more
        follower.last_commit = time.monotonic() - QUIET_S
        second = judged_in((await follower.run()).events["detection"])
        found = shape(await store.conflicts(merged=False))
    finally:
        await store.close()
    assert (first, more, second, follower.more) == (100, True, 200, False)
    assert found == await in_commit(f"sqlite+aiosqlite:///{tmp_path}/ref.db", sends)


async def test_the_commits_mode_judges_what_waited_first(db_url: str, tmp_path: Path) -> None:
    sends = edits(2, 8)
    store = await Store(db_url).start()
    try:
        await stored_only(store, sends[:9])
        store.detector.in_commit = True
        for device, op in sends[9:]:
            await store.commit((device, [op]))
        assert await waiting(store) == 0
        found = shape(await store.conflicts())
    finally:
        await store.close()
    assert found == await in_commit(f"sqlite+aiosqlite:///{tmp_path}/ref.db", sends)


def test_the_daemon_judges_at_its_start_what_a_dead_one_left(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client, tmp_path: Path
) -> None:
    """Operations stored and acknowledged by a process that died before judging them:
    the daemon started on that database judges them with nothing published to it, in
    passes of two here, says in its log when it was behind and when it caught up, and
    the conflicts' messages reach the operators' topic."""
    url = f"sqlite+aiosqlite:///{tmp_path}/left.db"
    sends = edits(2, 3)

    async def leave() -> None:
        store = await Store(url).start()
        try:
            await stored_only(store, sends)
        finally:
            await store.close()

    asyncio.run(leave())
    daemon = make_daemon(broker.port, db_url=url, start=False, CONFLICTS__PASS_MAX_OPS="2")
    client.subscribe(f"{daemon.root}/conflicts")
    daemon.start()
    wait_for(lambda: judged(url))
    assert sorted((e.members, e.severity) for e in stored_conflicts(url)) == [
        ((f"op-{e}-0", f"op-{e}-1", f"op-{e}-2"), "high") for e in range(2)
    ]
    wait_for(lambda: "conflict detection caught up" in daemon.log())
    log = daemon.log()
    assert log.index("conflict detection behind the stored operations") < log.index(
        "conflict detection caught up"
    )
    # each conflict was detected, then (its third member judged in a later pass) updated
    wait_for(lambda: len([m for m in client.all if m.topic.endswith("/conflicts")]) >= 4)
    events = sorted(
        (m.json()["conflict"]["entity_id"], m.json()["event"], m.json()["conflict"]["member_count"])
        for m in client.all
        if m.topic.endswith("/conflicts")
    )
    assert events == [
        ("wo-0", "conflict.detected", 2),
        ("wo-0", "conflict.updated", 3),
        ("wo-1", "conflict.detected", 2),
        ("wo-1", "conflict.updated", 3),
    ]


def test_an_entity_the_database_refuses_to_judge_is_left_unjudged_and_the_rest_goes_on(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client, tmp_path: Path
) -> None:
    """A trigger refuses any conflict member named `poison...`: the pass that judges the
    entity holding one is refused, the waiting entities are judged one by one, the one
    refused alone is left unjudged with an error that names it, and the other's
    conflict is recorded. (Checked against: without the isolation, the whole pass is
    refused again at every turn and the clean entity's conflict is never recorded.)"""
    path = tmp_path / "poison.db"
    url = f"sqlite+aiosqlite:///{path}"
    asyncio.run(migrate.upgrade_async(url))
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON conflict_members"
            " WHEN NEW.op_id LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    daemon = make_daemon(broker.port, db_url=url)
    client.subscribe(f"{daemon.root}/devices/+/sync/ack")
    for device, op_id, entity_id in (
        ("d1", "poison-1", "wo-bad"),
        ("d1", "g-1", "wo-good"),
        ("d2", "b-2", "wo-bad"),
        ("d2", "g-2", "wo-good"),
    ):
        op = sync_op(op_id, entity_id=entity_id, changes={"title": {"old": "", "new": op_id}})
        assert send_one(client, daemon.root, device, op)["status"] == "stored"
    wait_for(lambda: judged(url))
    assert [e.members for e in stored_conflicts(url)] == [("g-1", "g-2")]
    lines = [
        json.loads(line)
        for line in daemon.log().splitlines()
        if "this entity's waiting operations stay unjudged" in line
    ]
    assert [(line["entity_id"], line["error"]) for line in lines] == [("wo-bad", "IntegrityError")]
