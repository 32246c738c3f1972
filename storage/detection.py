"""Which stored operations conflict detection judges, and when: in the commit that
stores them, or after the ack, from the log.

Every entity row records the version up to which its operations were judged
(`entities.detected_version`); storing operations moves `version` past it, and
judging them (`Detector.detect`) moves it up again. What lies between is waiting,
and a partial index finds it. So a crash between the two loses nothing, another
instance's leftovers are found like one's own, and an entity's operations are
judged once, in version order, under its row lock, whichever instance stores or
judges them (docs/decisions/0018-detection-after-the-ack.md).

- **After the ack** (`conflicts.detect = "after_ack"`, the default): the commit
  stores, scores and counts; the engine answers and acks; then, whenever it has no
  batch to commit (or detection has waited `conflicts.max_delay_s` behind a
  backlog), it commits a `DetectionPass`, which judges what waits in the log.
- **In the commit** (`"in_commit"`): the sync step judges the batch's operations in
  the transaction that stores them, and what waited before them first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflicts import OpView
from handlers.records import OpRecord
from storage.conflict_store import COMPOUND_CHUNK
from storage.conflicts import Detected, Detector, EntityKey, skip, view
from storage.db import chunks, driver_rows
from storage.sync_log import VIEW_COLUMNS, Before, Prior, op_view
from storage.writer import Step, Written

JUDGED = "judged"
"""The event that counts the operations a pass judged (`{"event", "count"}`)."""


SKIPPED = "skipped"
"""The event that counts the entities a pass left unjudged (`{"event", "count"}`)."""


class DetectionPass(msgspec.Struct, frozen=True):
    """The writer's record of one pass: judge at most `max_ops` waiting operations.

    A pass the database refuses is isolated as a batch is (the writer's bisection,
    storage/writer.py): the follower commits one record per waiting `entity`, and for
    an entity refused alone a record that `skip`s it: its waiting operations are
    marked judged without joining any conflict, so that one entity cannot stop
    detection for all."""

    max_ops: int
    entity: tuple[str, str] | None = None
    skip: bool = False


class DetectionStep(Step):
    """A pass of detection after the ack, in a transaction of its own.

    Its events are the detector's, and `JUDGED` with how many operations it judged:
    fewer than it might have means that it caught up (with what this instance may
    take: on PostgreSQL, entities another instance holds locked are skipped)."""

    record_type = DetectionPass
    name = "detection"

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.after: EntityKey | None = None
        """Where the last pass stopped: the next one starts past it, so that a few busy
        entities cannot keep the others waiting."""

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        skipped = sorted(r.entity for r in records if r.skip and r.entity is not None)
        if skipped:
            await skip(conn, skipped)
            return Written(events=[{"event": SKIPPED, "count": len(skipped)}])
        ranges: dict[EntityKey, tuple[int, int]] = {}
        prior: Prior = {}
        chosen = sorted((r.entity, r.max_ops) for r in records if r.entity is not None)
        for entity, budget in chosen:
            await _waiting(conn, ("=", entity), budget, ranges, prior)
        if not chosen:
            max_ops = sum(record.max_ops for record in records)
            # Past where the last pass stopped, then from the start up to there.
            sides = ((">", self.after), ("<=", self.after)) if self.after else (("", None),)
            for side in sides:
                budget = max_ops - sum(end - start for start, end in ranges.values())
                if budget > 0:
                    await _waiting(conn, side, budget, ranges, prior)
            self.after = next(reversed(ranges), None)
        ops = await _log_ops(conn, ranges)
        detected = await self.detector.detect(conn, ops, now_us, prior)
        judged = {"event": JUDGED, "count": len(ops)}
        return Written(outbox=detected.outbox, events=[judged, *detected.events])

    def committed(self) -> None:
        self.detector.committed()

    def failed(self) -> None:
        self.detector.failed()


async def in_commit(
    conn: AsyncConnection,
    detector: Detector,
    stored: Sequence[OpRecord],
    now_us: int,
    prior: Prior,
) -> Detected:
    """Judge the batch's stored operations in the transaction that stored them, each
    entity's waiting ones first (stored after the ack, or left by a crash)."""
    behind = {key: (b.detected, b.version) for key, b in prior.items() if b.detected < b.version}
    ops = [view(record) for record in stored]
    if behind:
        ops.extend(await _log_ops(conn, behind))
        prior = {
            key: b._replace(version=b.detected) if key in behind else b for key, b in prior.items()
        }
    return await detector.detect(conn, ops, now_us, prior)


_WAITING_COLUMNS = (
    "entity_type",
    "entity_id",
    "version",
    "detected_version",
    "summary_from",
    "delete_max_edited_at",
    "max_edited_at",
)
_WAITING = (
    "SELECT entity_type, entity_id, version, detected_version, summary_from,"
    " delete_max_edited_at, max_edited_at FROM entities"
    " WHERE version > detected_version{after}"
    " ORDER BY entity_type, entity_id LIMIT ?{lock}"
)


def _side(operator: str, key: EntityKey | None) -> tuple[str, list[Any]]:
    """The condition (and its parameters) on entities by key: `=` that one, `>` past
    it, `<=` up to it; none without a key."""
    if key is None:
        return "", []
    if operator == "=":
        return " AND entity_type = ? AND entity_id = ?", [key[0], key[1]]
    where = f" AND (entity_type {operator[0]} ? OR (entity_type = ? AND entity_id {operator} ?))"
    return where, [key[0], key[0], key[1]]


async def _waiting(
    conn: AsyncConnection,
    side: tuple[str, EntityKey | None],
    budget: int,
    ranges: dict[EntityKey, tuple[int, int]],
    prior: Prior,
) -> None:
    """Add the entities whose operations wait (on the `side` of a key: `(">", key)`,
    `("<=", key)`, `("=", key)` that one, or `("", None)` for all), locked
    (PostgreSQL: skipping those another transaction holds), to `ranges` with the
    versions this pass judges, at most `budget` in all, and to `prior` with what
    detection needs of each (`storage.sync_log.Before`, as of the range's start)."""
    postgres = conn.dialect.name == "postgresql"
    where, params = _side(*side)
    sql = _WAITING.format(after=where, lock=" FOR UPDATE SKIP LOCKED" if postgres else "")
    rows = await driver_rows(conn, sql, [*params, budget], _WAITING_COLUMNS)
    for row in rows:
        if budget <= 0:
            break
        entity = (row["entity_type"], row["entity_id"])
        start = row["detected_version"]
        end = min(row["version"], start + budget)
        budget -= end - start
        ranges[entity] = (start, end)
        prior[entity] = Before(
            start,
            row["summary_from"],
            row["delete_max_edited_at"],
            row["max_edited_at"],
            start,
        )


_LOG_PART = (
    f"SELECT {', '.join(VIEW_COLUMNS)} FROM sync_log"  # noqa: S608 - constant names
    " WHERE entity_type = ? AND entity_id = ? AND version > ? AND version <= ?"
)


async def _log_ops(conn: AsyncConnection, ranges: dict[EntityKey, tuple[int, int]]) -> list[OpView]:
    """The stored operations of each entity in its range of versions (start, end]."""
    ops: list[OpView] = []
    for part in chunks(sorted(ranges), COMPOUND_CHUNK):
        sql = " UNION ALL ".join([_LOG_PART] * len(part))
        params = [v for key in part for v in (key[0], key[1], *ranges[key])]
        ops.extend(op_view(row) for row in await driver_rows(conn, sql, params, VIEW_COLUMNS))
    return ops


async def waiting_entities(
    conn: AsyncConnection, limit: int, after: EntityKey | None = None
) -> list[EntityKey]:
    """The first `limit` entities past `after` whose operations wait, in key order (a
    read, without locks: what a refused pass is isolated among)."""
    where, params = _side(">", after)
    sql = _WAITING.format(after=where, lock="")
    rows = await driver_rows(conn, sql, [*params, limit], _WAITING_COLUMNS)
    return [(row["entity_type"], row["entity_id"]) for row in rows]


def judged_in(events: Sequence[Any]) -> int:
    """How many operations the passes whose events these are judged: fewer than they
    might have means that detection caught up."""
    return sum(event["count"] for event in events if event["event"] == JUDGED)
