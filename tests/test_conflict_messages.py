"""What an engine keeps in memory between commits never shows.

The detector builds a message's latest 50 members from the batch and from what it
kept of earlier commits (`storage.member_cache`), and takes an entity's summary
from its own last commit when no operation was stored since
(`storage.summary_cache`). Whatever it kept, each message must equal the record
read back after its commit, and the conflicts must be the oracle's: with chains
longer than 50 members, merges, deletes, operations that join late,
base_version, two instances taking turns on one database (each one's memory is
stale after the other's commit), and transactions that fail and are tried again,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.sync import SyncStep
from storage.writer import Step, Writer, WriteSet, Written
from tests.conflict_harness import ROOT, Store
from tests.conflict_oracle import as_expected, expected_conflicts
from tests.support import at, sync_op

Sent = tuple[str, dict[str, Any]]


class Workload:
    """Edits of one hot entity (a chain of more than 50 members) and of sparse ones
    (pairs that a stale summary would miss), half with a recent base_version."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.count = 0
        self.versions: dict[str, int] = {}
        self.stored: list[tuple[dict[str, Any], str]] = []

    def edit(self) -> Sent:
        rng = self.rng
        hot = rng.random() < 0.4
        entity = "hot" if hot else f"t{rng.randrange(8)}"
        names = rng.sample(["status", "title", "notes"], rng.choice([1, 1, 2]))
        values = ["a", "b", "c", 1] if hot else ["a", "b"]
        changes = {name: {"old": None, "new": rng.choice(values)} for name in names}
        delete = rng.random() < 0.05
        op = sync_op(
            f"op{self.count:03}",
            entity_id=entity,
            operation="delete" if delete else "update",
            changes={} if delete else changes,
            edited_at=at(rng.uniform(0, 400 if hot else 6000)),
        )
        self.count += 1
        version = self.versions[entity] = self.versions.get(entity, 0) + 1
        if rng.random() < 0.5:
            op["base_version"] = max(0, version - rng.randint(1, 3))
        device = f"d{rng.randrange(4)}"
        self.stored.append((op, device))
        return device, op

    def batch(self) -> list[Sent]:
        return [self.edit() for _ in range(self.rng.randint(1, 8))]


async def commit_and_check(store: Store, sends: list[Sent], batch: WriteSet | None = None) -> int:
    """Commit (as `batch` when given), then hold each new operators' message against the
    record read back; returns how many were checked."""
    seen = len(await store.notices())
    if batch is None:
        await store.commit(*[(device, [op]) for device, op in sends])
    else:
        await store.writer.commit(batch)
    checked = 0
    for notice in (await store.notices())[seen:]:
        if notice["topic"] == f"{ROOT}/conflicts":
            conflict = notice["payload"]["conflict"]
            assert conflict == await store.record(conflict["conflict_id"])
            checked += 1
    return checked


async def test_two_instances_taking_turns(db_url: str) -> None:
    work = Workload(7)
    instances = [await Store(db_url).start(), await Store(db_url).start()]
    checked = 0
    try:
        for turn in range(60):
            store = instances[work.rng.randrange(2)] if turn % 5 else instances[turn % 2]
            checked += await commit_and_check(store, work.batch())
        records = await instances[0].conflicts()
    finally:
        for store in instances:
            await store.close()
    assert checked > 30
    assert max(r["member_count"] for r in records) > 50
    assert {as_expected(r, r["member_ids"]) for r in records} == expected_conflicts(work.stored)


class Fault(msgspec.Struct):
    """A record whose step fails the transaction once, after detection ran."""

    failed: bool = False


class FailOnce(Step):
    record_type = Fault
    name = "faults"

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        for fault in records:
            if not fault.failed:
                fault.failed = True
                raise OperationalError("injected", {}, Exception("injected"))
        return Written()


async def test_a_failed_transaction_leaves_nothing_behind(db_url: str) -> None:
    """Every third commit fails once after detection changed its summaries and members in
    memory, and is tried again: what the failed attempt did must not be used. (In the
    commit's mode, so that the fault shares detection's transaction; a pass after the
    ack keeps the same detector state through the same hooks.)"""
    work = Workload(11)
    store = await Store(db_url, detect="in_commit").start()
    await store.writer.close()
    store.writer = Writer(store.engine, [SyncStep(store.detector), FailOnce()])
    checked = 0
    try:
        for turn in range(40):
            sends = work.batch()
            batch = None
            if turn % 3 == 2:
                batch = WriteSet([r for d, op in sends for r in store.decode(d, [op])] + [Fault()])
            checked += await commit_and_check(store, sends, batch)
        records = await store.conflicts()
    finally:
        await store.close()
    assert checked > 20
    assert {as_expected(r, r["member_ids"]) for r in records} == expected_conflicts(work.stored)
