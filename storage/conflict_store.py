"""Reading and resolving stored conflicts: what the `conflicts/*` admin commands do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from sqlalchemy import func, literal_column, select, union_all, update
from sqlalchemy.ext.asyncio import AsyncConnection

from storage import outbox
from storage.conflicts import iso_us, notices
from storage.schema import conflicts, user_counters

_decode = msgspec.json.decode

GROUPS = ("entity_type", "severity", "user_id", "hour")
HOUR_US = 3_600_000_000


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
        "detected_at": iso_us(row["detected_at"]),
        "resolved_at": None if row["resolved_at"] is None else iso_us(row["resolved_at"]),
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
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; returns the items and the id to continue below (None: last page)."""
    query = select(conflicts).order_by(conflicts.c.id.desc()).limit(limit + 1)
    if status is not None:
        query = query.where(conflicts.c.status == status)
    if severity is not None:
        query = query.where(conflicts.c.severity == severity)
    if entity_type is not None:
        query = query.where(conflicts.c.entity_type == entity_type)
    if below_id is not None:
        query = query.where(conflicts.c.id < below_id)
    rows = list((await conn.execute(query)).mappings())
    shown = rows[:limit]
    more = len(rows) > limit
    return [row_record(row) for row in shown], (shown[-1]["id"] if more else None)


class ResolveError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def resolve(
    conn: AsyncConnection,
    conflict_id: str,
    winner_op_id: str,
    by: str,
    now_us: int,
    root: str,
) -> dict[str, Any]:
    """Resolve an open conflict in the open transaction and write its notices.

    The UPDATE is conditional on `status = 'open'`, so two operators resolving
    the same conflict at once (on one instance or two) cannot both succeed.
    Raises ResolveError with reason `not_found`, `not_open` or `not_in_pair`.
    """
    current = await get(conn, conflict_id)
    if current is None:
        raise ResolveError("not_found", f"no conflict {conflict_id!r}")
    if winner_op_id not in current["op_ids"]:
        raise ResolveError(
            "not_in_pair", f"winner_op_id must be one of {current['op_ids']}, not {winner_op_id!r}"
        )
    result = await conn.execute(
        update(conflicts)
        .where(conflicts.c.conflict_id == conflict_id, conflicts.c.status == "open")
        .values(status="resolved", winner_op_id=winner_op_id, resolved_at=now_us, resolved_by=by)
    )
    if result.rowcount != 1:
        raise ResolveError("not_open", f"conflict {conflict_id} is {current['status']}, not open")
    record = await get(conn, conflict_id)
    assert record is not None
    await outbox.add(conn, notices(root, "conflict.resolved", record), now_us)
    return record


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
        name = iso_us(int(group) * HOUR_US) if group_by == "hour" else group
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
            ops, total = known.get(g["key"], (0, 0))
            g["ops_total"] = ops
            g["conflicts_total"] = total
            g["conflicts_per_op"] = round(total / ops, 4) if ops else None
    groups.sort(key=lambda g: (-g["count"], str(g["key"])))
    if group_by == "hour":
        groups.sort(key=lambda g: str(g["key"]))
    return {
        "since": iso_us(earliest) if rows or since_us is not None else None,
        "until": iso_us(now_us),
        "group_by": group_by,
        "total": int(total or 0),
        "per_hour": round(int(total or 0) / hours, 4),
        "groups": groups,
    }
