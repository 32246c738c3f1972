"""Storing sync operations: exactly once, each with its entity's next version.

Every step is one statement per batch, not per row: look up known op_ids, bump
every touched entity's version in one upsert, insert the new rows in one
executemany. They run for every batch, so they go straight to the driver
(storage/driver.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflicts import OpView
from handlers.records import OpRecord
from handlers.times import HOUR_US
from storage import driver
from storage.db import chunks, marks
from storage.schema import sync_log


class Before(NamedTuple):
    """An entity as this batch found it, read under its row lock."""

    version: int
    """0: the batch creates it."""
    summary_from: int | None
    """Where its conflict windows start (`entities.summary_from`); None: no windows."""
    delete_max: int | None
    """The greatest `edited_at` of its deletes, this batch's included."""
    edited_max: int | None
    """The greatest `edited_at` stored before this batch (or, for a batch of
    detection after the ack, any greater: it only chooses the slow path more often)."""
    detected: int
    """The version up to which detection judged its operations (`version` when it
    judged them all)."""


Prior = dict[tuple[str, str], Before]
"""Per entity the batch touched."""


async def store_ops(conn: AsyncConnection, records: Sequence[OpRecord], now_us: int) -> Prior:
    """Store `records` in the open transaction; set each one's status and version.

    A record whose op_id is already stored, or appeared earlier in this batch,
    becomes a `duplicate` with the stored version. Versions come from an atomic
    increment of the entity row, which also serializes writers of one entity
    across connections and instances: no version is handed out twice. Returns
    what the entities held before (see `Prior`), read under that same lock.
    """
    prior: Prior = {}
    if not records:
        return prior
    known = await _stored_versions(conn, {record.op_id for record in records})
    first: dict[str, OpRecord] = {}
    new: list[OpRecord] = []
    for record in records:
        if record.op_id in known:
            record.status, record.version = "duplicate", known[record.op_id]
        elif record.op_id in first:
            record.status = "duplicate"
        else:
            first[record.op_id] = record
            new.append(record)
    if new:
        prior = await _assign_versions(conn, new, now_us)
        await driver.execute_many(conn, _INSERT, [_row(record, now_us) for record in new])
        await _count(conn, new)
        for record in new:
            record.status = "stored"
    for record in records:
        if record.status == "duplicate" and record.version is None:
            record.version = first[record.op_id].version
    return prior


async def _stored_versions(conn: AsyncConnection, op_ids: Iterable[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for part in chunks(sorted(op_ids)):
        sql = f"SELECT op_id, version FROM sync_log WHERE op_id IN ({marks(part)})"  # noqa: S608 - placeholders only
        found.update(await driver.fetch(conn, sql, part))
    return found


async def _assign_versions(conn: AsyncConnection, new: list[OpRecord], now_us: int) -> Prior:
    """One upsert per chunk of entities: `version = version + k`, returning the result.

    Entities are locked in sorted order so two instances writing overlapping sets
    cannot deadlock; the ops of one entity take the k versions below the result,
    in arrival order. The same statement keeps the entity's greatest `edited_at`
    and that of its deletes, and hands back where its conflict windows start:
    what detection needs to choose its fast path.
    """
    prior: Prior = {}
    per_entity: dict[tuple[str, str], list[OpRecord]] = {}
    for record in new:
        per_entity.setdefault((record.entity_type, record.entity_id), []).append(record)
    keys = sorted(per_entity)
    for part in chunks(keys, _UPSERT_CHUNK):
        params: list[Any] = []
        for key in part:
            ops = per_entity[key]
            deletes = [r.edited_at_us for r in ops if r.operation == "delete"]
            edited = max(record.edited_at_us for record in ops)
            params += [*key, len(ops), now_us, edited, max(deletes, default=None)]
        sql = _VERSIONS_UPSERT.format(
            values=driver.values(len(part), 6), greatest=driver.greatest(conn)
        )
        for row in await driver.fetch(conn, sql, params):
            entity_type, entity_id, version, summary_from, delete_max, edited_max, det = row
            ops = per_entity[(entity_type, entity_id)]
            for offset, record in enumerate(ops):
                record.version = version - len(ops) + 1 + offset
            prior[(entity_type, entity_id)] = Before(
                version - len(ops), summary_from, delete_max, edited_max, det
            )
    return prior


_UPSERT_CHUNK = 500
"""Entities per versions upsert: 6 parameters each, under SQLite's limit of 32,766."""

_VERSIONS_UPSERT = (
    "INSERT INTO entities (entity_type, entity_id, version, updated_at, max_edited_at,"
    " delete_max_edited_at) VALUES {values}"
    " ON CONFLICT (entity_type, entity_id) DO UPDATE SET"
    " version = entities.version + excluded.version,"
    " updated_at = excluded.updated_at,"
    " max_edited_at = {greatest}(coalesce(entities.max_edited_at, excluded.max_edited_at),"
    " excluded.max_edited_at),"
    " prev_max_edited_at = entities.max_edited_at,"
    " delete_max_edited_at = {greatest}("
    "coalesce(entities.delete_max_edited_at, excluded.delete_max_edited_at),"
    " coalesce(excluded.delete_max_edited_at, entities.delete_max_edited_at))"
    " RETURNING entity_type, entity_id, version, summary_from, delete_max_edited_at,"
    " prev_max_edited_at, detected_version"
)
"""A new entity starts at its operations' count, with no windows (`summary_from` null)
and nothing judged (`detected_version` 0); a known one adds to its version and keeps
its greatest `edited_at`s. RETURNING hands back `prev_max_edited_at` as the greatest
`edited_at` before this batch."""


async def _count(conn: AsyncConnection, new: Sequence[OpRecord]) -> None:
    """Operations per hour (of receipt) and entity type: one upsert per batch."""
    counts: dict[tuple[int, str], int] = {}
    for record in new:
        key = (record.received_at_us // HOUR_US * HOUR_US, record.entity_type)
        counts[key] = counts.get(key, 0) + 1
    await driver.execute_many(conn, _COUNTS_UPSERT, [(*k, n) for k, n in sorted(counts.items())])


_COUNTS_UPSERT = (
    "INSERT INTO op_counts (hour, entity_type, ops) VALUES (?, ?, ?)"
    " ON CONFLICT (hour, entity_type) DO UPDATE SET ops = op_counts.ops + excluded.ops"
)


_COLUMNS = (
    "op_id",
    "device_id",
    "user_id",
    "entity_type",
    "entity_id",
    "operation",
    "changes",
    "edited_at",
    "received_at",
    "stored_at",
    "version",
    "base_version",
    "session_id",
    "batch_id",
    "device_meta",
)
_INSERT = (
    f"INSERT INTO sync_log ({', '.join(_COLUMNS)})"  # noqa: S608 - constant column names
    f" VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def _row(record: OpRecord, now_us: int) -> tuple[Any, ...]:
    """A `sync_log` row in `_COLUMNS`' order."""
    return (
        record.op_id,
        record.device_id,
        record.user_id,
        record.entity_type,
        record.entity_id,
        record.operation,
        record.changes_json,
        record.edited_at_us,
        record.received_at_us,
        now_us,
        record.version,
        record.base_version,
        record.session_id,
        record.batch_id,
        record.device_meta,
    )


async def history(
    conn: AsyncConnection, entity_type: str, entity_id: str, limit: int
) -> list[dict[str, Any]]:
    """An entity's operations, newest version first."""
    result = await conn.execute(
        select(sync_log)
        .where(sync_log.c.entity_type == entity_type, sync_log.c.entity_id == entity_id)
        .order_by(sync_log.c.version.desc())
        .limit(limit)
    )
    return [dict(row) for row in result.mappings()]


_decode_changes = msgspec.json.Decoder(dict[str, Any]).decode


VIEW_COLUMNS = (
    "op_id",
    "device_id",
    "user_id",
    "entity_type",
    "entity_id",
    "operation",
    "changes",
    "edited_at",
    "version",
    "base_version",
)
"""The `sync_log` columns `op_view` reads."""


def op_view(row: Mapping[str, Any]) -> OpView:
    """A stored operation (a `sync_log` row, or a row that selects its columns) as the
    conflict rules read it."""
    return OpView(
        op_id=row["op_id"],
        device_id=row["device_id"],
        user_id=row["user_id"],
        entity_type=row["entity_type"],
        entity_id=row["entity_id"],
        operation=row["operation"],
        changes=_decode_changes(row["changes"]),
        edited_at_us=row["edited_at"],
        version=row["version"],
        base_version=row["base_version"],
    )
