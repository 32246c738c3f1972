"""Reading and resolving stored conflicts: what the `conflicts/*` admin commands do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import func, literal_column, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflicts import notices
from handlers.records import ResolutionRecord
from handlers.times import HOUR_US, rfc3339
from storage.schema import conflicts, user_counters
from storage.writer import Step, Written

_decode = msgspec.json.decode

GROUPS = ("entity_type", "severity", "user_id", "hour")


def row_record(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored row as the conflict record of PROTOCOL.md."""
    return {
        "conflict_id": row["conflict_id"],
        "entity_type": row["entity_type"],
        "entity_id": row["entity_id"],
        "op_ids": [row["op_a"], row["op_b"]],
        "device_ids": [row["device_a"], row["device_b"]],
        "user_ids": [row["user_a"], row["user_b"]],
        "fields": _decode(row["fields"]),
        "values": _decode(row["field_values"]),
        "severity": row["severity"],
        "strategy": row["strategy"],
        "status": row["status"],
        "winner_op_id": row["winner_op_id"],
        "detected_at": rfc3339(row["detected_at"]),
        "resolved_at": rfc3339(row["resolved_at"]),
        "resolved_by": row["resolved_by"],
    }


async def get(conn: AsyncConnection, conflict_id: str) -> dict[str, Any] | None:
    result = await conn.execute(select(conflicts).where(conflicts.c.conflict_id == conflict_id))
    row = result.mappings().first()
    return None if row is None else row_record(row)


async def page(
    conn: AsyncConnection,
    *,
    status: str | None = None,
    severity: str | None = None,
    entity_type: str | None = None,
    below_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Up to `limit` rows, newest first, below `below_id` (a keyset page)."""
    query = select(conflicts).order_by(conflicts.c.id.desc()).limit(limit)
    if status is not None:
        query = query.where(conflicts.c.status == status)
    if severity is not None:
        query = query.where(conflicts.c.severity == severity)
    if entity_type is not None:
        query = query.where(conflicts.c.entity_type == entity_type)
    if below_id is not None:
        query = query.where(conflicts.c.id < below_id)
    return [dict(row) for row in (await conn.execute(query)).mappings()]


class ResolutionStep(Step):
    """Operators' resolutions, in the writer's transaction with their notices."""

    record_type = ResolutionRecord
    name = "resolutions"

    def __init__(self, root: str) -> None:
        self.root = root

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        written = Written()
        for record in records:
            if await resolve(conn, record, now_us):
                assert record.conflict is not None
                written.outbox.extend(notices(self.root, "conflict.resolved", record.conflict))
                written.events.append(record.conflict)
        return written

    def reset(self, records: Sequence[ResolutionRecord]) -> None:
        for record in records:
            record.outcome = "pending"
            record.conflict = None


async def resolve(conn: AsyncConnection, record: ResolutionRecord, now_us: int) -> bool:
    """Resolve an open conflict in the open transaction; set `record.outcome`.

    The UPDATE is conditional on `status = 'open'`, so two operators resolving
    the same conflict at once (on one instance or two) cannot both succeed.
    """
    current = await get(conn, record.conflict_id)
    record.conflict = current
    if current is None:
        record.outcome = "not_found"
        return False
    if record.winner_op_id not in current["op_ids"]:
        record.outcome = "not_in_pair"
        return False
    result = await conn.execute(
        update(conflicts)
        .where(conflicts.c.conflict_id == record.conflict_id, conflicts.c.status == "open")
        .values(
            status="resolved",
            winner_op_id=record.winner_op_id,
            resolved_at=now_us,
            resolved_by=record.by,
        )
    )
    if result.rowcount != 1:
        record.outcome = "not_open"
        return False
    record.conflict = await get(conn, record.conflict_id)
    record.outcome = "resolved"
    return True


async def stats(
    conn: AsyncConnection, since_us: int | None, group_by: str, now_us: int
) -> dict[str, Any]:
    """Conflicts detected since `since_us`, counted per group, with rates per hour.

    For `user_id`, each conflict counts once for each distinct user in it, and
    the user's all-time counters give `conflicts_per_op`.
    """
    c = conflicts.c
    where = [c.detected_at >= since_us] if since_us is not None else []
    if group_by == "user_id":
        first = select(c.user_a.label("key"), c.detected_at).where(*where)
        second = select(c.user_b.label("key"), c.detected_at).where(*where, c.user_b != c.user_a)
        source = union_all(first, second).subquery()
        key = source.c.key
        query = select(key, func.count(), func.min(source.c.detected_at)).group_by(key)
    else:
        if group_by == "hour":
            key = (c.detected_at / literal_column(str(HOUR_US))).label("key")
        else:
            key = getattr(c, group_by).label("key")
        query = select(key, func.count(), func.min(c.detected_at)).where(*where).group_by(key)
    rows = list(await conn.execute(query))
    total = (await conn.execute(select(func.count()).select_from(conflicts).where(*where))).scalar()
    earliest = since_us if since_us is not None else min((r[2] for r in rows), default=now_us)
    hours = max((now_us - earliest) / HOUR_US, 1 / 60)
    groups: list[dict[str, Any]] = []
    for group, count, _first in rows:
        name = rfc3339(int(group) * HOUR_US) if group_by == "hour" else group
        groups.append({"key": name, "count": int(count), "per_hour": round(count / hours, 4)})
    if group_by == "user_id" and groups:
        users = [g["key"] for g in groups]
        counters = await conn.execute(
            select(user_counters.c.user_id, user_counters.c.ops, user_counters.c.conflicts).where(
                user_counters.c.user_id.in_(users)
            )
        )
        known = {user: (ops, n) for user, ops, n in counters}
        for g in groups:
            ops, taken_part = known.get(g["key"], (0, 0))
            g["ops_total"] = ops
            g["conflicts_total"] = taken_part
            g["conflicts_per_op"] = round(taken_part / ops, 4) if ops else None
    groups.sort(key=lambda g: (-g["count"], str(g["key"])))
    if group_by == "hour":
        groups.sort(key=lambda g: str(g["key"]))
    return {
        "since": rfc3339(earliest) if rows or since_us is not None else None,
        "until": rfc3339(now_us),
        "group_by": group_by,
        "total": int(total or 0),
        "per_hour": round(int(total or 0) / hours, 4),
        "groups": groups,
    }
