"""The conflict definition of PROTOCOL.md, one hand-written case per rule.

Each case stores operations through the real writer (on SQLite and on PostgreSQL)
and compares the conflict records with the ones written here by hand; the
brute-force oracle must agree with the hand-written answer too, so that the
property tests that lean on it lean on something checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from storage import conflict_store
from tests.conflict_harness import ROOT, Store
from tests.conflict_oracle import Expected, as_expected, expected_conflicts
from tests.support import sync_op

T0 = "2026-11-29T12:00:00Z"


def at(seconds: float) -> str:
    """T0 plus `seconds`, to the microsecond."""
    moment = datetime(2026, 11, 29, 12, tzinfo=UTC) + timedelta(
        microseconds=round(seconds * 1_000_000)
    )
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


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
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "a")},
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
        {Expected(("a", "b"), ("flag",), "low", "auto_resolved", "b")},
    ),
    Case(
        "agreeing fields do not count, the rest does",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "n"})),
            ("d2", upd("b", {"title": "y", "notes": "n"})),
        ),
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
    ),
    Case(
        "delete vs update: critical, the update's fields, open for an operator",
        one_by_one(("d1", delete("a")), ("d2", upd("b", {"title": "y", "notes": "z"}))),
        {Expected(("a", "b"), ("notes", "title"), "critical", "open", None)},
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
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
    ),
    Case(
        "window edge: exactly window_s apart conflicts",
        one_by_one(("d1", upd("a", {"title": "x"}, 0)), ("d2", upd("b", {"title": "y"}, 300))),
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
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
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
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
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
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
        {Expected(("a", "b"), ("status",), "high", "auto_resolved", "b")},
    ),
    Case(
        "two fields: medium",
        one_by_one(
            ("d1", upd("a", {"title": "x", "notes": "m"})),
            ("d2", upd("b", {"title": "y", "notes": "n"})),
        ),
        {Expected(("a", "b"), ("notes", "title"), "medium", "auto_resolved", "b")},
    ),
    Case(
        "three devices on one field: three pairs",
        one_by_one(
            ("d1", upd("a", {"title": "x"}, 1)),
            ("d2", upd("b", {"title": "y"}, 2)),
            ("d3", upd("c", {"title": "z"}, 3)),
        ),
        {
            Expected(("a", "b"), ("title",), "low", "auto_resolved", "b"),
            Expected(("a", "c"), ("title",), "low", "auto_resolved", "c"),
            Expected(("b", "c"), ("title",), "low", "auto_resolved", "c"),
        },
    ),
    Case(
        "three devices in one commit: the same three pairs",
        [
            [
                ("d1", upd("a", {"title": "x"}, 1)),
                ("d2", upd("b", {"title": "y"}, 2)),
                ("d3", upd("c", {"title": "z"}, 3)),
            ]
        ],
        {
            Expected(("a", "b"), ("title",), "low", "auto_resolved", "b"),
            Expected(("a", "c"), ("title",), "low", "auto_resolved", "c"),
            Expected(("b", "c"), ("title",), "low", "auto_resolved", "c"),
        },
    ),
    Case(
        "other entity: none",
        one_by_one(
            ("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "y"}) | {"entity_id": "t2"})
        ),
        set(),
    ),
    Case(
        "a duplicate is stored once and conflicts once",
        one_by_one(
            ("d1", upd("a", {"title": "x"})),
            ("d2", upd("b", {"title": "y"})),
            ("d2", upd("b", {"title": "y"})),
            ("d1", upd("a", {"title": "x"})),
        ),
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
    ),
    Case(
        "tie on edited_at: the greater op_id wins",
        one_by_one(("d2", upd("b", {"title": "y"})), ("d1", upd("a", {"title": "x"}))),
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
    ),
    Case(
        "first_writer_wins",
        one_by_one(("d1", upd("a", {"title": "x"}, 5)), ("d2", upd("b", {"title": "y"}, 1))),
        {Expected(("a", "b"), ("title",), "low", "auto_resolved", "b")},
        {"types": {"task": {"strategy": "first_writer_wins"}}},
    ),
    Case(
        "manual strategy: open, no winner",
        one_by_one(("d1", upd("a", {"title": "x"})), ("d2", upd("b", {"title": "y"}))),
        {Expected(("a", "b"), ("title",), "low", "open", None)},
        {"types": {"task": {"strategy": "manual"}}},
    ),
    Case(
        "manual_at_or_above high keeps a high one open",
        one_by_one(
            ("d1", upd("a", {"status": "x", "title": "p"})),
            ("d2", upd("b", {"status": "y", "title": "q"})),
        ),
        {Expected(("a", "b"), ("status", "title"), "high", "open", None)},
        {"manual_at_or_above": "high"},
    ),
    Case(
        "configured critical fields replace the defaults",
        one_by_one(("d1", upd("a", {"status": "x"})), ("d2", upd("b", {"status": "y"}))),
        {Expected(("a", "b"), ("status",), "low", "auto_resolved", "b")},
        {"types": {"task": {"critical_fields": ["title"]}}},
    ),
]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/rules.db"
    else:
        yield request.getfixturevalue("pg_url")


def oracle_config(config: dict[str, Any]) -> dict[str, Any]:
    types = config.get("types", {})
    out: dict[str, Any] = {
        "manual_at_or_above": config.get("manual_at_or_above", "critical"),
        "strategies": {t: c["strategy"] for t, c in types.items() if "strategy" in c},
    }
    if any("critical_fields" in c for c in types.values()):
        from tests.conflict_oracle import DEFAULT_CRITICAL

        out["critical"] = {
            **DEFAULT_CRITICAL,
            **{t: set(c["critical_fields"]) for t, c in types.items() if "critical_fields" in c},
        }
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_rule(case: Case, db_url: str) -> None:
    sends = [send for commit in case.commits for send in commit]
    oracle = expected_conflicts(
        [(op, device) for device, op in sends], **oracle_config(case.config)
    )
    assert oracle == case.expected, "the oracle disagrees with the hand-written answer"
    store = await Store(db_url, **case.config).start()
    try:
        for commit in case.commits:
            await store.commit(*[(device, [op]) for device, op in commit])
        records = await store.conflicts()
    finally:
        await store.close()
    assert {as_expected(r) for r in records} == case.expected
    assert len(records) == len(case.expected)


async def test_record_and_notices_exactly(tmp_path: Path) -> None:
    """The whole record of PROTOCOL.md, and its four outbox rows, field by field."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db").start()
    try:
        await store.commit(("d1", [upd("a", {"status": "done", "title": "x"}, 10)]))
        b = sync_op(
            "b",
            user_id="u2",
            changes={"status": {"old": "open", "new": "blocked"}, "title": {"old": "", "new": "x"}},
            edited_at=at(20),
        )
        batch = await store.commit(("d2", [b]))
        (record,) = await store.conflicts()
        notices = await store.notices()
        users, devices = await store.counters()
    finally:
        await store.close()
    assert batch.events["ops"] == [record]
    detected_at = record.pop("detected_at")
    assert detected_at.endswith("Z") and detected_at.startswith("20")
    assert record == {
        "conflict_id": record["conflict_id"],
        "entity_type": "task",
        "entity_id": "t1",
        "op_ids": ["a", "b"],
        "device_ids": ["d1", "d2"],
        "user_ids": ["u1", "u2"],
        "fields": ["status"],
        "values": {
            "status": {"a": {"old": None, "new": "done"}, "b": {"old": "open", "new": "blocked"}}
        },
        "severity": "high",
        "strategy": "last_writer_wins",
        "status": "auto_resolved",
        "winner_op_id": "b",
        "resolved_at": None,
        "resolved_by": None,
    }
    record["detected_at"] = detected_at
    event = {"event": "conflict.detected", "conflict": record}
    assert notices == [
        {"channel": "mqtt", "topic": f"{ROOT}/conflicts", "event_type": None, "payload": event},
        {
            "channel": "mqtt",
            "topic": f"{ROOT}/devices/d1/conflicts",
            "event_type": None,
            "payload": event,
        },
        {
            "channel": "mqtt",
            "topic": f"{ROOT}/devices/d2/conflicts",
            "event_type": None,
            "payload": event,
        },
        {
            "channel": "webhook",
            "topic": None,
            "event_type": "conflict.detected",
            "payload": record,
        },
    ]
    assert users == {"u1": (1, 1), "u2": (1, 1)}
    assert devices == {"d1": 1, "d2": 1}


async def test_detection_off_stores_no_conflicts(tmp_path: Path) -> None:
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db", enabled=False).start()
    try:
        await store.commit(("d1", [upd("a", {"title": "x"})]), ("d2", [upd("b", {"title": "y"})]))
        assert await store.conflicts() == []
        users, devices = await store.counters()
        assert users == {"u1": (2, 0)}
        assert devices == {"d1": 1, "d2": 1}
    finally:
        await store.close()


async def test_window_cache_after_restart_hits_recent_and_misses_late(tmp_path: Path) -> None:
    """Warm-up at start covers recent edits; a late op goes to the database and still
    meets the ops of its own time. Both paths are taken (hit and miss counted)."""
    url = f"sqlite+aiosqlite:///{tmp_path}/w.db"
    t0_us = 1_795_953_600_000_000
    store = await Store(url, cache_max_ops=5000).start(t0_us)
    try:
        await store.commit(("d1", [upd("old", {"title": "x"}, -7200)]))
        for n in range(3):
            await store.commit(("d1", [upd(f"new{n}", {"title": f"n{n}"}, 0)]))
    finally:
        await store.close()
    store = await Store(url, cache_max_ops=5000).start(t0_us + 60_000_000)
    try:
        assert store.warmed == 1
        cache = store.detector.cache
        assert cache is not None
        await store.commit(("d2", [upd("recent", {"title": "r"}, 30)]))
        assert (cache.hits, cache.misses) == (1, 0)
        await store.commit(("d3", [upd("late", {"title": "L"}, -7110)]))
        assert (cache.hits, cache.misses) == (1, 1)
        pairs = sorted(tuple(r["op_ids"]) for r in await store.conflicts())
    finally:
        await store.close()
    assert pairs == [
        ("late", "old"),
        ("new0", "recent"),
        ("new1", "recent"),
        ("new2", "recent"),
    ]


async def test_detection_off_then_on_forgets_the_cache(tmp_path: Path) -> None:
    """Ops stored while detection is off are not in the cache; turned back on, the
    detector must ask the database and still find them."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db", cache_max_ops=5000).start()
    try:
        await store.commit(("d1", [upd("a", {"title": "x"})]))
        assert store.detector.cache is not None
        store.detector.enabled = False
        await store.commit(("d2", [upd("b", {"title": "y"})]))
        store.detector.enabled = True
        await store.commit(("d3", [upd("c", {"title": "z"})]))
        pairs = sorted(tuple(r["op_ids"]) for r in await store.conflicts())
    finally:
        await store.close()
    assert pairs == [("a", "c"), ("b", "c")]


async def test_entities_of_unknown_history_are_looked_up(tmp_path: Path) -> None:
    """Detection skips an entity whose earlier edits all lie before the window; an
    entity stored before the `max_edited_at` column (null) is always looked up."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/r.db", cache_max_ops=0).start()
    try:
        await store.commit(("d1", [upd("a", {"title": "x"})]))
        await store.commit(("d1", [upd("old", {"title": "x"}, -3600) | {"entity_id": "t2"}]))
        async with store.engine.begin() as conn:
            await conn.exec_driver_sql("update entities set max_edited_at = null")
        assert store.detector.skipped == 2  # both entities were new
        await store.commit(("d2", [upd("b", {"title": "y"}, 10)]))
        assert store.detector.skipped == 2  # unknown history: looked up
        await store.commit(("d2", [upd("c", {"title": "y"}) | {"entity_id": "t2"}]))
        assert store.detector.skipped == 2
        # t2's history is known again (old, then c): nothing within d's window.
        await store.commit(("d3", [upd("d", {"title": "z"}, 1000) | {"entity_id": "t2"}]))
        skipped = store.detector.skipped
        pairs = sorted(tuple(r["op_ids"]) for r in await store.conflicts())
    finally:
        await store.close()
    assert pairs == [("a", "b")]
    assert skipped == 3


async def test_stats_by_user_keeps_the_total_of_all_conflicts(tmp_path: Path) -> None:
    """Three conflicts, each user in two: `total` is 3, each user's count 2.

    Checked against: the user loop writing each user's all-time count into the
    variable that later became `total` (the answer said 2)."""
    store = await Store(f"sqlite+aiosqlite:///{tmp_path}/s.db").start()
    try:
        pairs = [("e1", "u1", "u2"), ("e2", "u1", "u3"), ("e3", "u2", "u3")]
        for n, (entity, first, second) in enumerate(pairs):
            await store.commit(
                (
                    f"d-{first}",
                    [upd(f"{entity}-a", {"title": "x"}, user_id=first) | {"entity_id": entity}],
                ),
                (
                    f"d-{second}",
                    [
                        upd(f"{entity}-b", {"title": f"y{n}"}, user_id=second)
                        | {"entity_id": entity}
                    ],
                ),
            )
        async with store.engine.connect() as conn:
            stats = await conflict_store.stats(conn, None, "user_id", 1_900_000_000_000_000)
    finally:
        await store.close()
    assert stats["total"] == 3
    assert {g["key"]: (g["count"], g["conflicts_total"]) for g in stats["groups"]} == {
        "u1": (2, 2),
        "u2": (2, 2),
        "u3": (2, 2),
    }
