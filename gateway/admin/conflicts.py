"""`conflicts/list`, `conflicts/get`, `conflicts/resolve`, `conflicts/stats`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import Limit, Progress, Writes, answer_of, below, invalid, page, us
from gateway.admin.server import Command
from handlers.fields import AwareTime, Str64, Str128
from handlers.times import now_us
from storage import conflict_store

_encode = msgspec.json.Encoder().encode


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["open", "auto_resolved", "resolved"] | None = None
    severity: Literal["low", "medium", "high", "critical"] | None = None
    entity_type: Str64 | None = None
    limit: Limit = 100
    cursor: str | None = None


class GetArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64


class ResolveArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64
    winner_op_id: Str64
    by: Str128


class StatsArgs(msgspec.Struct, forbid_unknown_fields=True):
    since: AwareTime | None = None
    group_by: Literal["entity_type", "severity", "user_id", "hour"] = "severity"


class ConflictCommands:
    """Reads from the database; a resolution goes through the engine, which commits it
    with its `conflict.resolved` notices."""

    def __init__(self, database: AsyncEngine, writes: Writes) -> None:
        self.database = database
        self.writes = writes

    def commands(self) -> list[Command]:
        return [
            Command("conflicts/list", self.list, ListArgs),
            Command("conflicts/get", self.get, GetArgs),
            Command("conflicts/resolve", self.resolve, ResolveArgs, writes=True),
            Command("conflicts/stats", self.stats, StatsArgs),
        ]

    async def list(self, args: ListArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            rows = await conflict_store.page(
                conn,
                status=args.status,
                severity=args.severity,
                entity_type=args.entity_type,
                below_id=below(args.cursor),
                limit=args.limit + 1,
            )
        return page(rows, args.limit, conflict_store.row_record)

    async def get(self, args: GetArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            record = await conflict_store.get(conn, args.conflict_id)
        if record is None:
            raise invalid(f"no conflict {args.conflict_id!r}", "conflict_id")
        return record

    async def resolve(self, args: ResolveArgs, _progress: Progress) -> dict[str, Any]:
        """Resolve an open conflict; the record and `conflict.resolved` commit together."""
        body = _encode(
            {"conflict_id": args.conflict_id, "winner_op_id": args.winner_op_id, "by": args.by}
        )
        return answer_of(await self.writes("conflict_resolution", body))

    async def stats(self, args: StatsArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            return await conflict_store.stats(conn, us(args.since), args.group_by, now_us())
