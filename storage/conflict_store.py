"""Reading conflicts as PROTOCOL.md writes them, and operators' resolutions.

What the `conflicts/*` admin commands and the conflict messages read: a conflict
record with a page of its members (each with the old and new values of the
conflict's fields), pages of conflicts, counts per group; and the writer's step
that applies an operator's resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import (
    Select,
    and_,
    distinct,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.conflicts import MEMBERS_SHOWN, ConflictNotices, Group, OpView
from handlers.records import ResolutionRecord
from handlers.times import HOUR_US, rfc3339
from storage.db import chunks, driver_rows
from storage.schema import (
    conflict_members,
    conflict_totals,
    conflicts,
    op_counts,
    sync_log,
    user_counters,
)
from storage.sync_log import VIEW_COLUMNS, op_view
from storage.writer import Step, Written

_decode = msgspec.json.decode
_decode_group = msgspec.json.Decoder(Group).decode
_encode = msgspec.json.Encoder().encode

GROUPS = ("entity_type", "severity", "user_id", "hour")
COMPOUND_CHUNK = 100
"""Parts of one UNION ALL: well under SQLite's limit of 500 compound selects."""


# -- records ----------------------------------------------------------------------------


def record(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored conflict as the record of PROTOCOL.md, without its members."""
    return {
        "conflict_id": row["conflict_id"],
        "entity_type": row["entity_type"],
        "entity_id": row["entity_id"],
        "status": row["status"],
        "severity": row["severity"],
        "strategy": row["strategy"],
        "fields": _decode(row["fields"]),
        "winners": _decode(row["winners"]),
        "member_count": row["member_count"],
        "device_ids": _decode(row["device_ids"]),
        "user_ids": _decode(row["user_ids"]),
        "detected_at": rfc3339(row["detected_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "resolved_at": rfc3339(row["resolved_at"]),
        "resolved_by": row["resolved_by"],
        "merged_into": row["merged_into"],
        "note": row["note"],
    }


def member(row: Mapping[Any, Any], fields: Sequence[str]) -> dict[str, Any]:
    """A member as a record shows it: its changes of the conflict's fields only."""
    changes = _decode(row["changes"])
    return {
        "op_id": row["op_id"],
        "device_id": row["device_id"],
        "user_id": row["user_id"],
        "operation": row["operation"],
        "version": row["version"],
        "edited_at": rfc3339(row["edited_at"]),
        "changes": {name: changes[name] for name in fields if name in changes},
    }


def _members_query(conflict_id: str, below_version: int | None, limit: int) -> Select[Any]:
    """The latest members of one conflict: one range of the (conflict_id, version) index."""
    m, s = conflict_members.c, sync_log.c
    query = (
        select(
            m.conflict_id,
            m.op_id,
            m.device_id,
            m.user_id,
            m.version,
            s.operation,
            s.edited_at,
            s.changes,
        )
        .join_from(conflict_members, sync_log, s.op_id == m.op_id)
        .where(m.conflict_id == conflict_id)
        .order_by(m.version.desc())
        .limit(limit)
    )
    if below_version is not None:
        query = query.where(m.version < below_version)
    return query


async def members(
    conn: AsyncConnection,
    conflict_id: str,
    fields: Sequence[str],
    *,
    below_version: int | None = None,
    limit: int = MEMBERS_SHOWN,
) -> list[dict[str, Any]]:
    """The latest stored members first (one index range, whatever the group's size)."""
    query = _members_query(conflict_id, below_version, limit)
    return [member(row, fields) for row in (await conn.execute(query)).mappings()]


_LATEST_COLUMNS = (
    "conflict_id",
    "op_id",
    "device_id",
    "user_id",
    "entity_type",
    "entity_id",
    "version",
    "operation",
    "edited_at",
    "changes",
    "base_version",
)
_LATEST_PART = (
    "SELECT * FROM (SELECT m.conflict_id, m.op_id, m.device_id, m.user_id, m.entity_type,"
    " m.entity_id, m.version, s.operation, s.edited_at, s.changes, s.base_version"
    " FROM conflict_members m JOIN sync_log s ON s.op_id = m.op_id WHERE m.conflict_id = ?"
    " ORDER BY m.version DESC LIMIT ?) AS latest"
)


async def latest_members(
    conn: AsyncConnection, conflict_ids: Sequence[str]
) -> dict[str, list[OpView]]:
    """The latest MEMBERS_SHOWN members of each conflict, latest first, as whole
    operations: one statement per chunk of conflicts, each part one range of the
    (conflict_id, version) index."""
    found: dict[str, list[OpView]] = {}
    for part in chunks(sorted(conflict_ids), COMPOUND_CHUNK):
        sql = " UNION ALL ".join([_LATEST_PART] * len(part))
        params = [value for conflict_id in part for value in (conflict_id, MEMBERS_SHOWN)]
        for row in await driver_rows(conn, sql, params, _LATEST_COLUMNS):
            found.setdefault(row["conflict_id"], []).append(op_view(row))
    for views in found.values():
        views.sort(key=lambda op: op.version, reverse=True)
    return found


async def get(
    conn: AsyncConnection,
    conflict_id: str,
    *,
    below_version: int | None = None,
    limit: int = MEMBERS_SHOWN,
) -> dict[str, Any] | None:
    """The record with a page of its members (the latest `limit` by default)."""
    result = await conn.execute(select(conflicts).where(conflicts.c.conflict_id == conflict_id))
    row = result.mappings().first()
    if row is None:
        return None
    found = record(row)
    found["members"] = await members(
        conn, conflict_id, found["fields"], below_version=below_version, limit=limit
    )
    return found


async def page(
    conn: AsyncConnection,
    *,
    status: str | None = None,
    severity: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    device_id: str | None = None,
    below_id: int | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Up to `limit` rows, newest first, below `below_id` (a keyset page)."""
    c = conflicts.c
    query = select(conflicts).order_by(c.id.desc()).limit(limit)
    for column, value in ((c.status, status), (c.severity, severity)):
        if value is not None:
            query = query.where(column == value)
    if entity_type is not None:
        query = query.where(c.entity_type == entity_type)
    if entity_id is not None:
        query = query.where(c.entity_id == entity_id)
    if device_id is not None:
        with_device = select(conflict_members.c.conflict_id).where(
            conflict_members.c.device_id == device_id
        )
        query = query.where(c.conflict_id.in_(with_device))
    if below_id is not None:
        query = query.where(c.id < below_id)
    return [dict(row) for row in (await conn.execute(query)).mappings()]


_OPS_COLUMNS = (*VIEW_COLUMNS, "conflict_id")
_OPS_PART = (
    "SELECT s.op_id, s.device_id, s.user_id, s.entity_type, s.entity_id, s.operation,"
    " s.changes, s.edited_at, s.version, s.base_version, m.conflict_id FROM sync_log s"
    " LEFT OUTER JOIN conflict_members m ON m.op_id = s.op_id"
    " WHERE s.entity_type = ? AND s.entity_id = ? AND ({ranges})"
)


async def entities_ops(
    conn: AsyncConnection,
    wanted: Mapping[tuple[str, str], tuple[int | None, int | None, int | None]],
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Per entity, its stored operations edited in [lo, hi] (hi None: to the end) or
    above a version, each with the conflict it is a member of (null: none); `wanted`
    maps each entity to its (lo, hi, above_version). One statement per chunk of
    entities, each part a range of the entity's indexes."""
    parts: list[tuple[str, list[Any]]] = []
    for (entity_type, entity_id), (lo, hi, above_version) in sorted(wanted.items()):
        ranges: list[str] = []
        params: list[Any] = [entity_type, entity_id]
        if lo is not None and hi is None:
            ranges.append("s.edited_at >= ?")
            params.append(lo)
        elif lo is not None:
            ranges.append("s.edited_at BETWEEN ? AND ?")
            params += [lo, hi]
        if above_version is not None:
            ranges.append("s.version > ?")
            params.append(above_version)
        if ranges:
            parts.append((_OPS_PART.format(ranges=" OR ".join(ranges)), params))
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for chunk in chunks(parts, COMPOUND_CHUNK):
        sql = " UNION ALL ".join(sql for sql, _params in chunk)
        params = [value for _sql, values in chunk for value in values]
        for row in await driver_rows(conn, sql, params, _OPS_COLUMNS):
            found.setdefault((row["entity_type"], row["entity_id"]), []).append(row)
    return found


# -- counts ---------------------------------------------------------------------------


async def waiting(conn: AsyncConnection) -> int:
    """Stored operations that conflict detection has not judged yet, on every instance
    (storage/detection.py): after the ack, what it is behind."""
    rows = await driver_rows(conn, WAITING_SQL, (), ("n",))
    return int(rows[0]["n"])


WAITING_SQL = (
    "SELECT COALESCE(SUM(version - detected_version), 0) FROM entities"
    " WHERE version > detected_version"
)
"""`waiting`'s statement, plain SQL without parameters: the tests and benchmarks that
wait for detection to catch up run it with their own drivers."""


async def stats(
    conn: AsyncConnection, since_us: int | None, group_by: str, now_us: int
) -> dict[str, Any]:
    """Conflicts (not merged) detected since `since_us` and member operations that
    joined since then, per group, each with the operations stored in the same span
    and the rates per stored operation.

    Per `user_id`, a conflict counts once for each distinct user among its members,
    and the operations are the user's all-time count (no per-user time series)."""
    c, m = conflicts.c, conflict_members.c
    since = since_us if since_us is not None else 0
    live = and_(c.status != "merged", c.detected_at >= since)
    joined = m.joined_at >= since
    if group_by == "hour":
        conflict_key: Any = (c.detected_at / literal_column(str(HOUR_US))).label("key")
        member_key: Any = (m.joined_at / literal_column(str(HOUR_US))).label("key")
    elif group_by == "severity":
        conflict_key = c.severity.label("key")
        member_key = c.severity.label("key")
    elif group_by == "user_id":
        conflict_key = m.user_id.label("key")
        member_key = m.user_id.label("key")
    else:
        conflict_key = c.entity_type.label("key")
        member_key = m.entity_type.label("key")
    members_from = conflict_members.join(conflicts, c.conflict_id == m.conflict_id)
    if group_by == "user_id":
        counted = (
            select(conflict_key, func.count(distinct(c.conflict_id)))
            .select_from(members_from)
            .where(live)
            .group_by(conflict_key)
        )
    else:
        counted = select(conflict_key, func.count()).where(live).group_by(conflict_key)
    joined_counts = (
        select(member_key, func.count())
        .select_from(members_from)
        .where(joined, c.status != "merged")
        .group_by(member_key)
    )
    groups: dict[Any, dict[str, Any]] = {}
    for key, count in await conn.execute(counted):
        groups.setdefault(key, {"conflicts": 0, "members": 0})["conflicts"] = int(count)
    for key, count in await conn.execute(joined_counts):
        groups.setdefault(key, {"conflicts": 0, "members": 0})["members"] = int(count)
    ops = await _ops(conn, since, group_by, list(groups))
    total_ops = await _ops_total(conn, since)
    items = []
    for key, counts in groups.items():
        stored = ops.get(key, total_ops if group_by == "severity" else 0)
        name = rfc3339(int(key) * HOUR_US) if group_by == "hour" else key
        items.append({"key": name, **counts, **_rates(counts, stored)})
    if group_by == "hour":
        items.sort(key=lambda g: str(g["key"]))
    else:
        items.sort(key=lambda g: (-g["conflicts"], -g["members"], str(g["key"])))
    totals = {
        "conflicts": int(
            (await conn.execute(select(func.count()).select_from(conflicts).where(live))).scalar()
            or 0
        ),
        "members": int(
            (
                await conn.execute(
                    select(func.count())
                    .select_from(members_from)
                    .where(joined, c.status != "merged")
                )
            ).scalar()
            or 0
        ),
    }
    return {
        "since": rfc3339(since_us),
        "until": rfc3339(now_us),
        "group_by": group_by,
        **totals,
        **_rates(totals, total_ops),
        "groups": items,
    }


def _rates(counts: Mapping[str, int], ops: int) -> dict[str, Any]:
    return {
        "ops": ops,
        "conflicts_per_op": round(counts["conflicts"] / ops, 6) if ops else None,
        "members_per_op": round(counts["members"] / ops, 6) if ops else None,
    }


async def _ops_total(conn: AsyncConnection, since_us: int) -> int:
    hour = since_us // HOUR_US * HOUR_US
    result = await conn.execute(select(func.sum(op_counts.c.ops)).where(op_counts.c.hour >= hour))
    return int(result.scalar() or 0)


async def _ops(
    conn: AsyncConnection, since_us: int, group_by: str, keys: list[Any]
) -> dict[Any, int]:
    """The stored operations of each group's span (the rates' denominators)."""
    hour = since_us // HOUR_US * HOUR_US
    o = op_counts.c
    if group_by == "entity_type":
        query = select(o.entity_type, func.sum(o.ops)).where(o.hour >= hour).group_by(o.entity_type)
    elif group_by == "hour":
        query = select(o.hour / literal_column(str(HOUR_US)), func.sum(o.ops)).where(o.hour >= hour)
        query = query.group_by(o.hour)
    elif group_by == "user_id":
        found: dict[Any, int] = {}
        for part in chunks(sorted(str(k) for k in keys)):
            result = await conn.execute(
                select(user_counters.c.user_id, user_counters.c.ops).where(
                    user_counters.c.user_id.in_(part)
                )
            )
            found.update({user: int(n) for user, n in result})
        return found
    else:
        return {}
    return {key: int(n) for key, n in await conn.execute(query)}


# -- resolutions --------------------------------------------------------------------------


class ResolutionStep(Step):
    """Operators' resolutions, in the writer's transaction with their notices."""

    record_type = ResolutionRecord
    name = "resolutions"

    def __init__(self, notices: ConflictNotices) -> None:
        self.notices = notices

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        written = Written()
        for resolution in records:
            if await resolve(conn, resolution, now_us):
                assert resolution.conflict is not None
                devices = resolution.conflict["device_ids"]
                written.outbox += self.notices.event(
                    "conflict.resolved", resolution.conflict, devices
                )
                written.events.append(resolution.conflict)
        return written

    def reset(self, records: Sequence[ResolutionRecord]) -> None:
        for resolution in records:
            resolution.outcome = "pending"
            resolution.problem = None
            resolution.problem_path = None
            resolution.conflict = None


def _refuse(resolution: ResolutionRecord, message: str, path: str) -> bool:
    resolution.outcome = "refused"
    resolution.problem = message
    resolution.problem_path = path
    return False


async def resolve(conn: AsyncConnection, resolution: ResolutionRecord, now_us: int) -> bool:
    """Resolve a conflict in the open transaction; set the resolution's outcome.

    `winner_op_id` wins every conflict field it changes (a delete: all of them);
    `winners` names the winner of single fields (and wins over `winner_op_id`).
    Every field of the conflict gets a winner that is a member changing it, or
    the resolution is refused, naming the argument at fault. The UPDATE is
    conditional on the status it read, so of two operators resolving one
    conflict at once (on one instance or two) only one succeeds.
    """
    found = await get(conn, resolution.conflict_id, limit=0)
    resolution.conflict = found
    if found is None:
        return _refuse(resolution, f"no conflict {resolution.conflict_id!r}", "conflict_id")
    status = found["status"]
    if status == "merged":
        message = f"conflict {resolution.conflict_id} was merged into {found['merged_into']}"
        return _refuse(resolution, message, "conflict_id")
    if status == "resolved":
        message = f"conflict {resolution.conflict_id} is resolved already"
        return _refuse(resolution, message, "conflict_id")
    chosen = [resolution.winner_op_id] if resolution.winner_op_id else []
    chosen += list(resolution.winners.values())
    changed = await _member_changes(conn, resolution.conflict_id, chosen)
    fields: list[str] = found["fields"]
    winners: dict[str, str] = {}
    if resolution.winner_op_id is not None:
        if resolution.winner_op_id not in changed:
            message = f"{resolution.winner_op_id!r} is not a member of this conflict"
            return _refuse(resolution, message, "winner_op_id")
        mine = changed[resolution.winner_op_id]
        winners.update(
            {name: resolution.winner_op_id for name in fields if mine is None or name in mine}
        )
    for name, op_id in sorted(resolution.winners.items()):
        path = f"winners.{name}"
        if name not in fields:
            return _refuse(resolution, f"{name!r} is not a field of this conflict", path)
        if op_id not in changed:
            return _refuse(resolution, f"{op_id!r} is not a member of this conflict", path)
        theirs = changed[op_id]
        if theirs is not None and name not in theirs:
            return _refuse(resolution, f"{op_id!r} does not change {name!r}", path)
        winners[name] = op_id
    missing = [name for name in fields if name not in winners]
    if missing:
        message = f"no winner for {', '.join(missing)}: name them in winners"
        return _refuse(resolution, message, "winners")
    result = await conn.execute(
        update(conflicts)
        .where(conflicts.c.conflict_id == resolution.conflict_id, conflicts.c.status == status)
        .values(
            status="resolved",
            winners=_encode(winners).decode(),
            resolved_at=now_us,
            resolved_by=resolution.by,
            updated_at=now_us,
        )
    )
    if result.rowcount != 1:
        message = f"conflict {resolution.conflict_id} changed meanwhile; look again"
        return _refuse(resolution, message, "conflict_id")
    resolution.conflict = await get(conn, resolution.conflict_id)
    resolution.outcome = "resolved"
    return True


async def _member_changes(
    conn: AsyncConnection, conflict_id: str, op_ids: Sequence[str]
) -> dict[str, set[str] | None]:
    """Of `op_ids`, the members of the conflict, with the fields each changes (None for
    a delete: it changes every field)."""
    if not op_ids:
        return {}
    m, s = conflict_members.c, sync_log.c
    result = await conn.execute(
        select(s.op_id, s.operation, s.changes)
        .join_from(conflict_members, sync_log, s.op_id == m.op_id)
        .where(m.conflict_id == conflict_id, m.op_id.in_(sorted(set(op_ids))))
    )
    return {
        op_id: None if operation == "delete" else set(_decode(changes))
        for op_id, operation, changes in result
    }


async def totals(conn: AsyncConnection) -> tuple[dict[str, int], int]:
    """Conflicts not merged, per severity, and operations in a conflict: all instances'."""
    result = await conn.execute(select(conflict_totals.c.key, conflict_totals.c.n))
    counts = {key: int(n) for key, n in result}
    per_severity = {
        key.partition(":")[2]: n
        for key, n in sorted(counts.items())
        if key.startswith("severity:") and n
    }
    return per_severity, counts.get("members", 0)
