"""Migration 0005 on a database that fieldgate v1 filled: pairs become groups.

tests/data/v1_conflicts.json holds the rows v1's own daemon stored for the
scenario in tests/data/fill_v1.py (pairs judged, two resolved by an operator
through v1's `conflicts/resolve`). Each test loads them into a database at
revision 0004, SQLite or PostgreSQL, upgrades to head, and reads back every v2
record and member; then v2 goes on from there: a new edit joins a migrated
group and another starts a conflict on an entity v1 had no conflict for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from handlers.times import rfc3339
from storage import conflict_store, migrate
from tests.conflict_harness import ROOT, Store

FIXTURE = json.loads((Path(__file__).parent / "data" / "v1_conflicts.json").read_text())
V1_PAIRS = {(p["op_a"], p["op_b"]): p for p in FIXTURE["conflicts"]}


@pytest.fixture
def url(db_url: str) -> Iterator[str]:
    """A database at revision 0004 holding v1's rows, upgraded to head."""
    found = db_url
    assert FIXTURE["revision"] == "0004"
    migrate.upgrade(found, "0004")
    engine = create_engine(found.replace("+aiosqlite", ""))
    with engine.begin() as conn:
        for table in ("sync_log", "entities", "conflicts"):
            rows = FIXTURE[table]
            columns = list(rows[0])
            conn.execute(
                text(
                    f"INSERT INTO {table} ({', '.join(columns)})"
                    f" VALUES ({', '.join(':' + c for c in columns)})"
                ),
                rows,
            )
            if found.startswith("postgresql") and "id" in columns:
                # rows written with their ids: move the sequence past them, as v1's were
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id))"
                        f" FROM {table}"
                    )
                )
    engine.dispose()
    migrate.upgrade(found)
    yield found


def v1_time(op_a: str, op_b: str, column: str) -> str | None:
    value: int | None = V1_PAIRS[(op_a, op_b)][column]
    return rfc3339(value)


def expected(
    entity: str,
    members: list[str],
    **record: Any,
) -> dict[str, Any]:
    kind, _, entity_id = entity.partition("/")
    devices = sorted({f"d{m[-1]}" for m in members})
    return {
        "entity_type": kind,
        "entity_id": entity_id,
        "member_count": len(members),
        "device_ids": devices,
        "user_ids": [f"u{d[1:]}" for d in devices],
        "resolved_at": None,
        "resolved_by": None,
        "merged_into": None,
        "note": None,
        "member_ids": members,
        **record,
    }


MIGRATED = [
    expected(
        "task/t-single",
        ["single-1", "single-2"],
        status="auto_resolved",
        severity="low",
        strategy="last_writer_wins",
        fields=["title"],
        winners={"title": "single-2"},
        detected_at=v1_time("single-1", "single-2", "detected_at"),
        updated_at=v1_time("single-1", "single-2", "detected_at"),
    ),
    expected(
        "asset/a-resolved",
        ["resolved-1", "resolved-2"],
        status="resolved",
        severity="high",
        strategy="manual",
        fields=["location"],
        winners={"location": "resolved-2"},
        detected_at=v1_time("resolved-1", "resolved-2", "detected_at"),
        updated_at=v1_time("resolved-1", "resolved-2", "resolved_at"),
        resolved_at=v1_time("resolved-1", "resolved-2", "resolved_at"),
        resolved_by="ops-anna",
    ),
    expected(
        "task/t-chain",
        ["chain-1", "chain-2", "chain-3"],
        status="auto_resolved",
        severity="low",
        strategy="last_writer_wins",
        fields=["title"],
        winners={"title": "chain-3"},
        detected_at=v1_time("chain-1", "chain-2", "detected_at"),
        updated_at=v1_time("chain-2", "chain-3", "detected_at"),
    ),
    expected(
        "task/t-bridge",
        ["bridge-1", "bridge-2", "bridge-3"],
        status="auto_resolved",
        severity="low",
        strategy="last_writer_wins",
        fields=["notes", "title"],
        winners={"notes": "bridge-3", "title": "bridge-3"},
        detected_at=v1_time("bridge-1", "bridge-3", "detected_at"),
        updated_at=v1_time("bridge-2", "bridge-3", "detected_at"),
    ),
    expected(
        "work_order/wo-del",
        ["del-1", "del-2"],
        status="open",
        severity="critical",
        strategy="last_writer_wins",
        fields=["status"],
        winners={},
        detected_at=v1_time("del-1", "del-2", "detected_at"),
        updated_at=v1_time("del-1", "del-2", "detected_at"),
    ),
    expected(
        "asset/a-mixed",
        ["mixed-1", "mixed-2", "mixed-3"],
        status="open",
        severity="high",
        strategy="manual",
        fields=["location"],
        winners={},
        detected_at=v1_time("mixed-1", "mixed-2", "detected_at"),
        updated_at=v1_time("mixed-2", "mixed-3", "detected_at"),
        note="migrated from v1: the resolution of mixed-1/mixed-2 by ops-anna covered"
        " one pair of this conflict, not all of it",
    ),
]


def first_pair_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group keeps the id of its earliest pair: check it, and leave it out."""
    for record in records:
        pairs = [p for p in FIXTURE["conflicts"] if p["entity_id"] == record["entity_id"]]
        first = min(pairs, key=lambda p: (p["detected_at"], p["id"]))
        assert record.pop("conflict_id") == first["conflict_id"]
    return records


async def test_pairs_become_groups(url: str) -> None:
    store = await Store(url).start()
    try:
        found = await store.conflicts(merged=True)
        ids = {r["entity_id"]: r["conflict_id"] for r in found}
        assert sorted(first_pair_ids(found), key=lambda r: r["detected_at"]) == sorted(
            MIGRATED, key=lambda r: r["detected_at"]
        )
        async with store.engine.connect() as conn:
            assert await conflict_store.totals(conn) == ({"critical": 1, "high": 2, "low": 3}, 15)
            # members carry their old and new values, the latest first
            record = await conflict_store.get(conn, ids["t-chain"])
        assert record is not None
        assert [(m["op_id"], m["version"], m["changes"]) for m in record["members"]] == [
            ("chain-3", 3, {"title": {"old": "a", "new": "d"}}),
            ("chain-2", 2, {"title": {"old": "a", "new": "c"}}),
            ("chain-1", 1, {"title": {"old": "a", "new": "b"}}),
        ]
    finally:
        await store.close()


async def test_v2_goes_on_from_the_migrated_groups(url: str) -> None:
    store = await Store(url).start()
    try:
        before = {r["entity_id"]: r for r in await store.conflicts()}
        await store.commit(
            (
                "d4",
                [
                    {
                        "op_id": "chain-4",
                        "user_id": "u4",
                        "entity_type": "task",
                        "entity_id": "t-chain",
                        "operation": "update",
                        "changes": {"title": {"old": "a", "new": "e"}},
                        "edited_at": "2026-11-29T12:02:30Z",
                    }
                ],
            ),
            (
                "d3",
                [
                    {
                        "op_id": "alone-3",
                        "user_id": "u3",
                        "entity_type": "task",
                        "entity_id": "t-alone",
                        "operation": "update",
                        "changes": {"title": {"old": "b", "new": "x"}},
                        "edited_at": "2026-11-29T13:00:10Z",
                    }
                ],
            ),
        )
        await store.commit(
            (
                "d3",
                [
                    {
                        "op_id": "del-3",
                        "user_id": "u3",
                        "entity_type": "work_order",
                        "entity_id": "wo-del",
                        "operation": "update",
                        "changes": {"status": {"old": "open", "new": "blocked"}},
                        "edited_at": "2026-11-29T12:00:08Z",
                    }
                ],
            )
        )
        after = {r["entity_id"]: r for r in await store.conflicts()}
        deleted = after["wo-del"]
        assert (deleted["conflict_id"], deleted["member_ids"], deleted["status"]) == (
            before["wo-del"]["conflict_id"],
            ["del-1", "del-2", "del-3"],
            "open",
        )
        chain = after["t-chain"]
        assert chain["conflict_id"] == before["t-chain"]["conflict_id"]
        assert (chain["member_ids"], chain["winners"], chain["status"]) == (
            ["chain-1", "chain-2", "chain-3", "chain-4"],
            {"title": "chain-4"},
            "auto_resolved",
        )
        alone = after["t-alone"]
        assert (alone["member_ids"], alone["severity"], alone["winners"]) == (
            ["alone-2", "alone-3"],
            "low",
            {"title": "alone-3"},
        )
        assert set(after) == set(before) | {"t-alone"}
        notices = [(n["topic"], n["payload"]["event"]) for n in await store.notices()]
        assert sorted(notices) == [
            (f"{ROOT}/conflicts", "conflict.detected"),
            (f"{ROOT}/conflicts", "conflict.updated"),
            (f"{ROOT}/conflicts", "conflict.updated"),
            (f"{ROOT}/devices/d2/conflicts", "conflict.detected"),
            (f"{ROOT}/devices/d3/conflicts", "conflict.detected"),
            (f"{ROOT}/devices/d3/conflicts", "conflict.updated"),
            (f"{ROOT}/devices/d4/conflicts", "conflict.updated"),
        ]
    finally:
        await store.close()
