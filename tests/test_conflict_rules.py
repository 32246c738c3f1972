"""The conflict definition of PROTOCOL.md (v2: groups), one hand-written case per rule.

Each case stores operations through the real writer (on SQLite and on PostgreSQL),
once with the window summaries (the fast path) and once judging every operation
against the database (the slow path), and compares the conflicts with the ones
written here by hand; the brute-force oracle must agree with the hand-written
answer too, so that the property tests that lean on it lean on something checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from handlers.conflict_versions import KEPT
from storage import conflict_store
from tests.conflict_harness import ROOT, Store
from tests.conflict_oracle import DEFAULT_CRITICAL, Expected, as_expected, expected_conflicts
from tests.support import at, sync_op

T0 = "2026-11-29T12:00:00Z"


def upd(op_id: str, changes: dict[str, Any], edited: float = 0.0, **extra: Any) -> dict[str, Any]:
    return sync_op(
        op_id,
        changes={k: {"old": None, "new": v} for k, v in changes.items()},
        edited_at=at(edited),
        **extra,
    )


def create(op_id: str, changes: dict[str, Any], edited: float = 0.0) -> dict[str, Any]:
    return upd(op_id, changes, edited, operation="create")


def delete(op_id: str, edited: float = 0.0) -> dict[str, Any]:
    return sync_op(op_id, operation="delete", changes={}, edited_at=at(edited))


def group(
    members: str, fields: str, severity: str, winners: str = "", status: str = "auto_resolved"
) -> Expected:
    """`group("a b", "title", "low", "title=b")`; `status="open"` has no winners."""
    pairs = (pair.split("=") for pair in winners.split())
    return Expected(
        tuple(sorted(members.split())),
        tuple(sorted(fields.split())),
        severity,
        status,
        tuple(sorted((name, op_id) for name, op_id in pairs)),
    )


@dataclass
class Case:
    name: str
    commits: list[list[tuple[str, dict[str, Any]]]]
    expected: set[Expected]
    config: dict[str, Any] = field(default_factory=dict)


def one_by_one(*sends: tuple[str, dict[str, Any]]) -> list[list[tuple[str, dict[str, Any]]]]:
    return [[send] for send in sends]


CASES = [
    Case(
        "same device: never a conflict",
        one_by_one(("d1", upd("a", {"title": "x"})), ("d1", upd("b", {"title": "y"}, 1))),
        set(),
    ),
    Case(
        "different devices, overlapping field: conflict, later edit wins",
        one_by_one(("d1", upd("a", {"title": "x"}, 5)), ("d2", upd("b", {"title": "y"}, 1))),
        {group("a b", "title", "low", "title=a")},
    ),
    Case(
        "disjoint fields: none",
        one_by_one(("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"notes": "y"}))),
        set(),
    ),
    Case(
        "same new value: they agree, none",
        one_by_one(("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "x"}))),
        set(),
    ),
    Case(
        "numbers by value: 1 agrees with 1.0",
        one_by_one(("d1", upd("a", {"size": 1})), ("d2", upd("b", {"size": 1.0}))),
        set(),
    ),
    Case(
        "true is not 1",
        one_by_one(("d1", upd("a", {"flag": True})), ("d2", upd("b", {"flag": 1}))),
        {group("a b", "flag", "low", "flag=b")},
    ),
    Case(
        "agreeing fields do not count, the rest does; winners only for conflict fields",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "n"})),
            ("d2", upd("b", {"title": "y", "notes": "n"})),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "delete vs update: critical, the update's fields, open for an operator",
        one_by_one(("d1", delete("a")), ("d2", upd("b", {"title": "y", "notes": "z"}))),
        {group("a b", "notes title", "critical", status="open")},
    ),
    Case(
        "delete vs delete: they agree, none",
        one_by_one(("d1", delete("a")), ("d2", delete("b", 1))),
        set(),
    ),
    Case(
        "create vs create: the fields both set, less agreements",
        one_by_one(
            ("d1", create("a", {"title": "x", "notes": "same"})),
            ("d2", create("b", {"title": "y", "notes": "same", "extra": 1})),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "window edge: exactly window_s apart conflicts",
        one_by_one(("d1", upd("a", {"title": "x"}, 0)), ("d2", upd("b", {"title": "y"}, 300))),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "window edge: one millisecond more does not",
        one_by_one(("d1", upd("a", {"title": "x"}, 0)), ("d2", upd("b", {"title": "y"}, 300.001))),
        set(),
    ),
    Case(
        "window edge, arriving in the other order",
        one_by_one(
            ("d2", upd("b", {"title": "y"}, 300)),
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d3", upd("c", {"title": "z"}, 600.001)),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "base_version seen: the later edit knew the earlier, none even within the window",
        one_by_one(
            ("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "y"}, 1, base_version=1))
        ),
        set(),
    ),
    Case(
        "base_version not seen: conflict even far outside the window",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 3000, base_version=0)),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "base_version of the earlier op does not decide; the later one's window does",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0, base_version=0)),
            ("d2", upd("b", {"title": "y"}, 3000)),
        ),
        set(),
    ),
    Case(
        "a critical field: high",
        one_by_one(("d1", upd("a", {"status": "done"})), ("d2", upd("b", {"status": "open"}))),
        {group("a b", "status", "high", "status=b")},
    ),
    Case(
        "two fields: medium",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "m"})),
            ("d2", upd("b", {"title": "y", "notes": "n"})),
        ),
        {group("a b", "notes title", "medium", "notes=b title=b")},
    ),
    Case(
        "three devices on one field: one conflict of three, not three pairs",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 1)),
            ("d2", upd("b", {"title": "y"}, 2)),
            ("d3", upd("c", {"title": "z"}, 3)),
        ),
        {group("a b c", "title", "low", "title=c")},
    ),
    Case(
        "three devices in one commit: the same one conflict",
        [
            [
                ("d1", upd("a", {"title": "x"}, 1)),
                ("d2", upd("b", {"title": "y"}, 2)),
                ("d3", upd("c", {"title": "z"}, 3)),
            ]
        ],
        {group("a b c", "title", "low", "title=c")},
    ),
    Case(
        "a chain: a collides with b, b with c, a and c do not: one conflict",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d1", upd("c", {"title": "z"}, 2)),
        ),
        {group("a b c", "title", "low", "title=c")},
    ),
    Case(
        "a bridge merges two conflicts into one; fields united",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d3", upd("c", {"notes": "m"}, 2)),
            ("d4", upd("d", {"notes": "n"}, 3)),
            ("d5", upd("e", {"title": "z", "notes": "o"}, 4)),
        ),
        {group("a b c d e", "notes title", "low", "notes=e title=e")},
    ),
    Case(
        "a bridge and more in one commit: what joined an absorbed conflict is in the other",
        [
            [("d3", upd("c", {"notes": "m"}, 2)), ("d4", upd("d", {"notes": "n"}, 3))],
            [
                ("d1", upd("a", {"title": "x", "size": 1}, 0)),
                ("d2", upd("b", {"title": "y"}, 1)),
                ("d5", upd("e", {"title": "z", "notes": "o"}, 4)),
                ("d6", upd("f", {"size": 2}, 5)),
                ("d7", upd("g", {"notes": "p"}, 6)),
            ],
        ],
        {group("a b c d e f g", "notes size title", "low", "notes=g size=f title=e")},
    ),
    Case(
        "a device's earlier edit in the window still collides, though its latest agrees",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d2", upd("c", {"title": "z"}, 2)),
            ("d1", upd("e", {"title": "z"}, 3)),
            ("d3", upd("n", {"title": "z"}, 4)),
        ),
        {group("a b c e n", "title", "low", "title=n")},
    ),
    Case(
        "an edit past the new one's window is not in it, though stored before",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 500)),
            ("d3", upd("c", {"title": "z"}, 150)),
        ),
        {group("a c", "title", "low", "title=c")},
    ),
    Case(
        "a member colliding on two fields makes a low conflict medium",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "m"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d3", upd("c", {"title": "z", "notes": "n"}, 2)),
        ),
        {group("a b c", "notes title", "medium", "notes=c title=c")},
    ),
    Case(
        "two late arrivals, far behind the rest, meet each other",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d3", upd("l1", {"notes": "p"}, -7200)),
            ("d1", upd("l2", {"notes": "q"}, -7199)),
        ),
        {group("a b", "title", "low", "title=b"), group("l1 l2", "notes", "low", "notes=l2")},
    ),
    Case(
        "operations in no conflict join when a later one collides with them",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d1", upd("a2", {"title": "w"}, 1)),
            ("d2", upd("b", {"title": "y"}, 2)),
        ),
        {group("a a2 b", "title", "low", "title=b")},
    ),
    Case(
        "a member's other fields are not the conflict's",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "p"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "a delete joins a conflict: critical, open",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d3", delete("c", 2)),
        ),
        {group("a b c", "title", "critical", status="open")},
    ),
    Case(
        "severity is the highest of the pairs'",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 0)),
            ("d2", upd("b", {"title": "y"}, 1)),
            ("d3", upd("c", {"title": "z", "status": "done"}, 2)),
            ("d4", upd("d", {"status": "open"}, 3)),
        ),
        {group("a b c d", "status title", "high", "status=d title=c")},
    ),
    Case(
        "other entity: none",
        one_by_one(
            ("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "y"}) | {"entity_id": "t2"})
        ),
        set(),
    ),
    Case(
        "a duplicate is stored once and counted once",
        one_by_one(
            ("d1", upd("a", {"title": "x"})),
            ("d2", upd("b", {"title": "y"})),
            ("d2", upd("b", {"title": "y"})),
            ("d1", upd("a", {"title": "x"})),
        ),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "tie on edited_at: the greater op_id wins",
        one_by_one(("d2", upd("b", {"title": "y"})), ("d1", upd("a", {"title": "x"}))),
        {group("a b", "title", "low", "title=b")},
    ),
    Case(
        "first_writer_wins",
        one_by_one(("d1", upd("a", {"title": "x"}, 5)), ("d2", upd("b", {"title": "y"}, 1))),
        {group("a b", "title", "low", "title=b")},
        {"types": {"task": {"strategy": "first_writer_wins"}}},
    ),
    Case(
        "first_writer_wins ties: the greater op_id, as for last_writer_wins (PROTOCOL.md)",
        one_by_one(("d1", upd("b", {"title": "x"})), ("d2", upd("a", {"title": "y"}))),
        {group("a b", "title", "low", "title=b")},
        {"types": {"task": {"strategy": "first_writer_wins"}}},
    ),
    Case(
        "manual strategy: open, no winners",
        one_by_one(("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "y"}))),
        {group("a b", "title", "low", status="open")},
        {"types": {"task": {"strategy": "manual"}}},
    ),
    Case(
        "manual_at_or_above high keeps a high one open",
        one_by_one(
            ("d1", upd("a", {"status": "x", "title": "p"})),
            ("d2", upd("b", {"status": "y", "title": "q"})),
        ),
        {group("a b", "status title", "high", status="open")},
        {"manual_at_or_above": "high"},
    ),
    Case(
        "configured critical fields replace the defaults",
        one_by_one(("d1", upd("a", {"status": "x"})), ("d2", upd("b", {"status": "y"}))),
        {group("a b", "status", "low", "status=b")},
        {"types": {"task": {"critical_fields": ["title"]}}},
    ),
]


def oracle_config(config: dict[str, Any]) -> dict[str, Any]:
    types = config.get("types", {})
    out: dict[str, Any] = {
        "manual_at_or_above": config.get("manual_at_or_above", "critical"),
        "strategies": {t: c["strategy"] for t, c in types.items() if "strategy" in c},
    }
    if any("critical_fields" in c for c in types.values()):
        out["critical"] = {
            **DEFAULT_CRITICAL,
            **{t: set(c["critical_fields"]) for t, c in types.items() if "critical_fields" in c},
        }
    return out


def found(records: list[dict[str, Any]]) -> set[Expected]:
    return {as_expected(r, r["member_ids"]) for r in records}


@pytest.mark.parametrize("windows", [True, False], ids=["fast", "slow"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_rule(case: Case, windows: bool, db_url: str) -> None:
    sends = [send for commit in case.commits for send in commit]
    oracle = expected_conflicts(
        [(op, device) for device, op in sends], **oracle_config(case.config)
    )
    assert oracle == case.expected, "the oracle disagrees with the hand-written answer"
    store = await Store(db_url, windows=windows, **case.config).start()
    try:
        for commit in case.commits:
            await store.commit(*[(device, [op]) for device, op in commit])
        records = await store.conflicts()
    finally:
        await store.close()
    assert found(records) == case.expected
    assert len(records) == len(case.expected)


async def test_record_and_messages_exactly(tmp_path: Path) -> None:
    """The whole record of PROTOCOL.md, its detected message to the operators and each
    member's device, then one updated message when a third member joins."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db").start()
    try:
        await store.commit(("d1", [upd("a", {"status": "done", "title": "x"}, 10)]))
        b = sync_op(
            "b",
            user_id="u2",
            changes={"status": {"old": "open", "new": "blocked"}, "title": {"old": "", "new": "x"}},
            edited_at=at(20),
        )
        committed = await store.commit(("d2", [b]))
        (conflict,) = await store.conflicts()
        record = await store.record(conflict["conflict_id"])
        first_notices = await store.notices()
        c = upd("c", {"status": "waiting"}, 30, user_id="u3")
        await store.commit(("d3", [c]))
        after = await store.record(conflict["conflict_id"])
        notices = (await store.notices())[len(first_notices) :]
        users, devices = await store.counters()
    finally:
        await store.close()
    assert committed.events["detection"] == [
        {"event": "judged", "count": 1},
        {"event": "detected", "severity": "high"},
        {"event": "joined", "count": 2},
    ]
    times = {name: record.pop(name) for name in ("detected_at", "updated_at")}
    assert all(value.endswith("Z") for value in times.values())
    assert record == {
        "conflict_id": conflict["conflict_id"],
        "entity_type": "task",
        "entity_id": "t1",
        "status": "auto_resolved",
        "severity": "high",
        "strategy": "last_writer_wins",
        "fields": ["status"],
        "winners": {"status": "b"},
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
                "operation": "update",
                "version": 2,
                "edited_at": at(20),
                "changes": {"status": {"old": "open", "new": "blocked"}},
            },
            {
                "op_id": "a",
                "device_id": "d1",
                "user_id": "u1",
                "operation": "update",
                "version": 1,
                "edited_at": at(10),
                "changes": {"status": {"old": None, "new": "done"}},
            },
        ],
    }
    record.update(times)
    event = {"event": "conflict.detected", "conflict": record}
    assert first_notices == [
        {"channel": "mqtt", "topic": f"{ROOT}/conflicts", "event_type": None, "payload": event},
        *(
            {
                "channel": "mqtt",
                "topic": f"{ROOT}/devices/{device}/conflicts",
                "event_type": None,
                "payload": event,
            }
            for device in ("d1", "d2")
        ),
    ]
    assert (after["member_count"], after["winners"]) == (3, {"status": "c"})
    assert [m["op_id"] for m in after["members"]] == ["c", "b", "a"]
    updated = {"event": "conflict.updated", "conflict": after, "joined": ["c"], "absorbed": []}
    assert notices == [
        {"channel": "mqtt", "topic": f"{ROOT}/conflicts", "event_type": None, "payload": updated},
        {
            "channel": "mqtt",
            "topic": f"{ROOT}/devices/d3/conflicts",
            "event_type": None,
            "payload": updated,
        },
    ]
    # Operations in a conflict per user, not pairs.
    assert users == {"u1": (1, 1), "u2": (1, 1), "u3": (1, 1)}
    assert devices == {"d1": 1, "d2": 1, "d3": 1}


async def test_a_merge_names_what_it_absorbed(tmp_path: Path) -> None:
    """The older conflict absorbs the newer: `merged` with `merged_into`, its members
    now the older one's, and one `conflict.updated` naming the joined op and the
    absorbed conflict."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/m.db").start()
    try:
        await store.commit(
            ("d1", [upd("a", {"title": "x"}, 0)]), ("d2", [upd("b", {"title": "y"}, 1)])
        )
        await store.commit(
            ("d3", [upd("c", {"notes": "m"}, 2)]), ("d4", [upd("d", {"notes": "n"}, 3)])
        )
        older, newer = await store.conflicts()
        seen = len(await store.notices())
        await store.commit(("d5", [upd("e", {"title": "z", "notes": "o"}, 4)]))
        (alive,) = await store.conflicts()
        absorbed = next(r for r in await store.conflicts(merged=True) if r["status"] == "merged")
        notices = (await store.notices())[seen:]
    finally:
        await store.close()
    assert alive["conflict_id"] == older["conflict_id"]
    assert alive["member_ids"] == ["a", "b", "c", "d", "e"]
    assert (absorbed["conflict_id"], absorbed["merged_into"], absorbed["member_ids"]) == (
        newer["conflict_id"],
        older["conflict_id"],
        [],
    )
    payloads = [n["payload"] for n in notices]
    assert [n["topic"] for n in notices] == [f"{ROOT}/conflicts", f"{ROOT}/devices/d5/conflicts"]
    assert all(p["event"] == "conflict.updated" for p in payloads)
    assert payloads[0]["joined"] == ["e"]
    assert payloads[0]["absorbed"] == [newer["conflict_id"]]


async def test_detection_off_then_on_rebuilds_the_summaries(tmp_path: Path) -> None:
    """Ops stored while detection is off are in no window summary: turned back on,
    detection reads the entity from the database (and builds its summary again)
    and still finds them."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db").start()
    try:
        await store.commit(("d1", [upd("a", {"title": "x"})]))
        store.detector.enabled = False
        await store.commit(("d2", [upd("b", {"title": "y"})]))
        store.detector.enabled = True
        slow_before = store.detector.slow
        await store.commit(("d3", [upd("c", {"title": "z"})]))
        slow = store.detector.slow - slow_before
        fast_before = store.detector.fast
        await store.commit(("d4", [upd("d", {"title": "w"})]))
        fast = store.detector.fast - fast_before
        records = await store.conflicts()
    finally:
        await store.close()
    # a and b never collide with each other (detection was off for b): only c and d
    # bring them in, and they all end in one conflict.
    assert [r["member_ids"] for r in records] == [["a", "b", "c", "d"]]
    assert (slow, fast) == (1, 1)


@pytest.mark.parametrize("detect", ["in_commit", "after_ack"])
async def test_an_entity_quiet_for_longer_than_the_window_is_not_read(
    tmp_path: Path, detect: str
) -> None:
    """Its summaries forgotten (detection was off), an entity whose latest stored edit
    is older than the window of the new ones starts empty summaries without reading
    the log (the fast path) when detection runs in the commit; after the ack, a pass
    knows only an upper bound of what was judged before it, so it reads the log once
    and builds the summaries from it. Either way a late edit that does reach back
    reads it, and finds its partner."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/q.db", detect=detect).start()
    try:
        store.detector.enabled = False
        await store.commit(("d1", [upd("old", {"title": "x"}, 0)]))
        store.detector.enabled = True
        fast, slow = store.detector.fast, store.detector.slow
        await store.commit(("d2", [upd("new", {"title": "y"}, 1000)]))
        await store.commit(("d3", [upd("newer", {"title": "z"}, 1010)]))
        paths = (store.detector.fast - fast, store.detector.slow - slow)
        await store.commit(("d4", [upd("late", {"title": "w"}, 10)]))
        records = await store.conflicts()
    finally:
        await store.close()
    assert paths == ((2, 0) if detect == "in_commit" else (1, 1))
    assert sorted(r["member_ids"] for r in records) == [["late", "old"], ["new", "newer"]]


async def test_which_path_judges_what(tmp_path: Path) -> None:
    """In-window edits of a summarized entity and an op whose base_version the kept
    versions reach take the fast path; a late arrival and a delete take the slow one."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/p.db").start()
    try:

        async def path(device: str, op: dict[str, Any]) -> str:
            fast, slow = store.detector.fast, store.detector.slow
            await store.commit((device, [op]))
            return (
                "fast"
                if store.detector.fast > fast
                else "slow"
                if store.detector.slow > slow
                else "?"
            )

        taken = [
            await path("d1", upd("a", {"title": "x"}, 1000)),
            await path("d2", upd("b", {"title": "y"}, 1001)),
            await path("d3", upd("late", {"title": "z"}, -5000)),
            await path("d4", upd("based", {"title": "q"}, 1002, base_version=1)),
            await path("d5", delete("gone", 1003)),
            await path("d6", upd("after", {"title": "w"}, 1004)),
        ]
    finally:
        await store.close()
    assert taken == ["fast", "fast", "slow", "fast", "slow", "slow"]


async def test_a_base_version_older_than_the_kept_versions_reads_the_log(tmp_path: Path) -> None:
    """The summary keeps the entity's last KEPT versions: a base_version further back
    is judged against the log (and still finds every op above it); one within them is
    not."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/v.db").start()
    try:
        kept = [upd(f"k{n:02}", {"title": f"v{n}"}, n) for n in range(KEPT + 2)]
        await store.commit(("d1", kept))
        slow = store.detector.slow
        await store.commit(("d2", [upd("old", {"title": "x"}, 40, base_version=1)]))
        reads = store.detector.slow - slow
        fast = store.detector.fast
        base = KEPT + 2  # the version before "old": it alone is concurrent
        await store.commit(("d3", [upd("new", {"title": "y"}, 41, base_version=base)]))
        judged = store.detector.fast - fast
        records = await store.conflicts()
    finally:
        await store.close()
    assert (reads, judged) == (1, 1)
    others = sorted(op["op_id"] for op in kept[1:])
    assert [r["member_ids"] for r in records] == [sorted([*others, "old", "new"])]


async def test_stats_count_conflicts_members_and_rates(tmp_path: Path) -> None:
    """Three conflicts, each user in two: per user 2 conflicts, 2 member ops; in all
    3 conflicts, 6 members, 6 ops stored, 0.5 conflicts per op.

    Checked against: the user loop writing each user's all-time count into the
    variable that later became the total (v1's `total` said 2)."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/s.db").start()
    try:
        pairs = [("e1", "u1", "u2"), ("e2", "u1", "u3"), ("e3", "u2", "u3")]
        for n, (entity, first, second) in enumerate(pairs):
            a = upd(f"{entity}-a", {"title": "x"}, user_id=first) | {"entity_id": entity}
            b = upd(f"{entity}-b", {"title": f"y{n}"}, user_id=second) | {"entity_id": entity}
            await store.commit((f"d-{first}", [a]), (f"d-{second}", [b]))
        async with store.engine.connect() as conn:
            by_user = await conflict_store.stats(conn, None, "user_id", 1_900_000_000_000_000)
            by_type = await conflict_store.stats(conn, None, "entity_type", 1_900_000_000_000_000)
    finally:
        await store.close()
    assert (by_user["conflicts"], by_user["members"], by_user["ops"]) == (3, 6, 6)
    assert by_user["conflicts_per_op"] == 0.5
    assert [(g["key"], g["conflicts"], g["members"], g["ops"]) for g in by_user["groups"]] == [
        ("u1", 2, 2, 2),
        ("u2", 2, 2, 2),
        ("u3", 2, 2, 2),
    ]
    assert by_type["groups"] == [
        {
            "key": "task",
            "conflicts": 3,
            "members": 6,
            "ops": 6,
            "conflicts_per_op": 0.5,
            "members_per_op": 1.0,
        }
    ]
