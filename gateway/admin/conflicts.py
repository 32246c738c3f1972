"""`conflicts/list`, `conflicts/get`, `conflicts/resolve`, `conflicts/stats`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import Limit, Writes, answer_of, below, encode_cursor, invalid, page, us
from gateway.admin.server import Command
from handlers.admin import Progress
from handlers.conflicts import MEMBERS_SHOWN
from handlers.fields import AwareTime, Str64, Str128
from handlers.times import now_us
from storage import conflict_store

_encode = msgspec.json.Encoder().encode


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["open", "auto_resolved", "resolved", "merged"] | None = None
    severity: Literal["low", "medium", "high", "critical"] | None = None
    entity_type: Str64 | None = None
    entity_id: Str128 | None = None
    device_id: Str64 | None = None
    limit: Limit = 100
    cursor: str | None = None


class GetArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64
    limit: Limit = MEMBERS_SHOWN
    cursor: str | None = None


class ResolveArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: Str64
    by: Str128
    winner_op_id: Str64 | None = None
    winners: dict[str, Str64] | None = None


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
        """Newest first (as detected), members left out."""
        async with self.database.connect() as conn:
            rows = await conflict_store.page(
                conn,
                status=args.status,
                severity=args.severity,
                entity_type=args.entity_type,
                entity_id=args.entity_id,
                device_id=args.device_id,
                below_id=below(args.cursor),
                limit=args.limit + 1,
            )
        return page(rows, args.limit, conflict_store.record)

    async def get(self, args: GetArgs, _progress: Progress) -> dict[str, Any]:
        """The conflict and a page of its members, the latest stored first; each member
        with the old and new values of the conflict's fields."""
        async with self.database.connect() as conn:
            found = await conflict_store.get(
                conn, args.conflict_id, below_version=below(args.cursor), limit=args.limit + 1
            )
        if found is None:
            raise invalid(f"no conflict {args.conflict_id!r}", "conflict_id")
        members = found["members"]
        more = len(members) > args.limit
        found["members"] = members[: args.limit]
        cursor = encode_cursor(found["members"][-1]["version"]) if more else None
        return {"conflict": found, "next_cursor": cursor}

    async def resolve(self, args: ResolveArgs, _progress: Progress) -> dict[str, Any]:
        """`winner_op_id` wins every field it changes, `winners` single fields; the
        resolution and `conflict.resolved` commit together."""
        if args.winner_op_id is None and not args.winners:
            raise invalid("give winner_op_id (a member) or winners (field -> member)", "winners")
        body = _encode(
            {
                "conflict_id": args.conflict_id,
                "by": args.by,
                "winner_op_id": args.winner_op_id,
                "winners": args.winners or {},
            }
        )
        return answer_of(await self.writes("conflict_resolution", body))

    async def stats(self, args: StatsArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            return await conflict_store.stats(conn, us(args.since), args.group_by, now_us())
