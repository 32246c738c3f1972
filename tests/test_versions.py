"""Entity versions under racing writers, on SQLite and on PostgreSQL.

Two `Writer`s on two engines (two connections; on PostgreSQL two genuinely
parallel sessions) commit interleaved batches on the same few entities. Per
entity the stored versions must be exactly 1..n, each op must carry the version
its record was handed, and the same op sent by both writers is stored once.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.records import OpRecord
from storage import migrate
from storage.db import create_engine
from storage.schema import entities, sync_log
from storage.writer import Writer, WriteSet
from tests.support import plain_writer

ENTITIES = ["e0", "e1", "e2"]
BATCH_SIZES = [1, 7, 3, 12, 5, 9, 2, 15, 4, 8]


def record(op_id: str, entity_id: str, device_id: str) -> OpRecord:
    return OpRecord(
        op_id=op_id,
        device_id=device_id,
        user_id="u1",
        entity_type="task",
        entity_id=entity_id,
        operation="update",
        changes={"status": {"old": "open", "new": op_id}},
        changes_json=f'{{"status":{{"old":"open","new":"{op_id}"}}}}',
        edited_at_us=1_790_000_000_000_000,
        received_at_us=1_790_000_000_000_000,
    )


def batches(records: list[OpRecord], shift: int) -> list[list[OpRecord]]:
    """Cut `records` into batches of varied sizes (different per writer)."""
    out: list[list[OpRecord]] = []
    start = 0
    index = shift
    while start < len(records):
        size = BATCH_SIZES[index % len(BATCH_SIZES)]
        out.append(records[start : start + size])
        start += size
        index += 1
    return out


class Pace:
    """Keeps racing writers at most one batch apart.

    Left alone, one writer on SQLite can take the lock and commit all its
    batches while the other sleeps in the busy handler, so the two never
    interleave and the race proves nothing (it happened in CI). Each writer
    still commits while the other's commit is in flight.
    """

    def __init__(self, work: list[list[list[OpRecord]]]) -> None:
        self.total = [len(parts) for parts in work]
        self.done = [0] * len(work)
        self.moved = asyncio.Condition()

    def may_go(self, me: int) -> bool:
        return all(
            self.done[me] <= done + 1 or done == total
            for done, total in zip(self.done, self.total, strict=True)
        )

    async def commit_all(self, me: int, writer: Writer, parts: list[list[OpRecord]]) -> None:
        for part in parts:
            async with self.moved:
                await self.moved.wait_for(lambda: self.may_go(me))
            await writer.commit(WriteSet(part))
            async with self.moved:
                self.done[me] += 1
                self.moved.notify_all()


async def stored_rows(engine: AsyncEngine) -> dict[str, tuple[str, int]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(sync_log.c.op_id, sync_log.c.entity_id, sync_log.c.version)
        )
        rows = [(op_id, entity_id, version) for op_id, entity_id, version in result.all()]
        versions = await conn.execute(select(entities.c.entity_id, entities.c.version))
        entity_rows = {entity_id: version for entity_id, version in versions.all()}
    assert len({op_id for op_id, _, _ in rows}) == len(rows), "an op_id is stored twice"
    per_entity: dict[str, list[int]] = {}
    for _, entity_id, version in rows:
        per_entity.setdefault(entity_id, []).append(version)
    for entity_id, taken in per_entity.items():
        assert sorted(taken) == list(range(1, len(taken) + 1)), (entity_id, taken)
    assert entity_rows == {entity_id: len(v) for entity_id, v in per_entity.items()}
    return {op_id: (entity_id, version) for op_id, entity_id, version in rows}


async def race(url: str, work: list[list[list[OpRecord]]]) -> dict[str, tuple[str, int]]:
    await migrate.upgrade_async(url)
    engines = [create_engine(url) for _ in work]
    writers = [plain_writer(engine) for engine in engines]
    try:
        pace = Pace(work)
        await asyncio.gather(
            *(
                pace.commit_all(me, w, parts)
                for me, (w, parts) in enumerate(zip(writers, work, strict=True))
            )
        )
        return await stored_rows(engines[0])
    finally:
        for writer in writers:
            await writer.close()
        for engine in engines:
            await engine.dispose()


def assert_in_commit_order(parts: list[list[OpRecord]]) -> None:
    """One writer's ops on one entity got increasing versions, in the order it sent them."""
    seen: dict[str, list[int]] = {}
    for part in parts:
        for rec in part:
            if rec.status == "stored":
                assert rec.version is not None
                seen.setdefault(rec.entity_id, []).append(rec.version)
    for entity_id, versions in seen.items():
        assert versions == sorted(versions), entity_id
        assert len(set(versions)) == len(versions), entity_id


async def test_racing_writers_never_share_a_version(db_url: str) -> None:
    per_writer = 240
    work = [
        batches(
            [
                record(f"w{w}-{i:04d}", ENTITIES[i % len(ENTITIES)], f"dev{w}")
                for i in range(per_writer)
            ],
            shift=w * 3,
        )
        for w in range(2)
    ]
    stored = await race(db_url, work)
    assert len(stored) == 2 * per_writer
    for parts in work:
        for part in parts:
            for rec in part:
                assert rec.status == "stored", rec
                assert stored[rec.op_id] == (rec.entity_id, rec.version), rec
        assert_in_commit_order(parts)
    # The writers did race: on some entity, each took a version below one of the other's.
    mine = [
        {rec.version or 0 for part in parts for rec in part if rec.entity_id == "e0"}
        for parts in work
    ]
    assert min(mine[0]) < max(mine[1]) and min(mine[1]) < max(mine[0])
    assert Counter(entity_id for entity_id, _ in stored.values()) == {
        entity_id: 2 * per_writer // len(ENTITIES) for entity_id in ENTITIES
    }


async def test_the_same_ops_from_two_writers_are_stored_once(db_url: str) -> None:
    """Both writers carry the same ops (a redelivery racing its original): one row each."""
    count = 180
    ids = [(f"op-{i:04d}", ENTITIES[i % len(ENTITIES)]) for i in range(count)]
    work = [
        batches([record(op_id, entity_id, "dev0") for op_id, entity_id in ids], shift=0),
        batches([record(op_id, entity_id, "dev1") for op_id, entity_id in reversed(ids)], shift=4),
    ]
    stored = await race(db_url, work)
    assert sorted(stored) == sorted(op_id for op_id, _ in ids)
    statuses: dict[str, list[str]] = {}
    for parts in work:
        for part in parts:
            for rec in part:
                assert rec.status in {"stored", "duplicate"}, rec
                assert stored[rec.op_id] == (rec.entity_id, rec.version), rec
                statuses.setdefault(rec.op_id, []).append(rec.status)
    # Exactly one of the two was the one that stored it.
    assert {op_id: sorted(s) for op_id, s in statuses.items()} == {
        op_id: ["duplicate", "stored"] for op_id, _ in ids
    }


async def test_one_batch_with_the_same_op_twice_and_a_known_op(db_url: str) -> None:
    await migrate.upgrade_async(db_url)
    engine = create_engine(db_url)
    writer = plain_writer(engine)
    try:
        await writer.commit(WriteSet([record("a", "e0", "d"), record("b", "e0", "d")]))
        again = [record("b", "e0", "d"), record("c", "e0", "d"), record("c", "e0", "d")]
        await writer.commit(WriteSet(again))
        assert [(r.op_id, r.status, r.version) for r in again] == [
            ("b", "duplicate", 2),
            ("c", "stored", 3),
            ("c", "duplicate", 3),
        ]
        assert await stored_rows(engine) == {"a": ("e0", 1), "b": ("e0", 2), "c": ("e0", 3)}
    finally:
        await writer.close()
        await engine.dispose()
