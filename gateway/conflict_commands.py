"""`conflicts/list`, `conflicts/get`, `conflicts/resolve`, `conflicts/stats`.

Merged into `gateway.commands.TABLE` by one line there.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.admin import Command, CommandError, Progress
from gateway.pages import decode_cursor, encode_cursor
from gateway.services import Services
from handlers.errors import Code
from storage import conflict_store

Limit = Annotated[int, Meta(ge=1, le=1000)]
ConflictId = Annotated[str, Meta(min_length=1, max_length=64)]
AwareTime = Annotated[datetime, Meta(tz=True)]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["open", "auto_resolved", "resolved"] | None = None
    severity: Literal["low", "medium", "high", "critical"] | None = None
    entity_type: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    limit: Limit = 100
    cursor: str | None = None


async def cmd_list(services: Services, args: ListArgs, _progress: Progress) -> dict[str, Any]:
    try:
        below = decode_cursor(args.cursor)
    except ValueError as exc:
        raise CommandError(Code.INVALID_ARGS, str(exc), "cursor") from None
    async with services.engine.connect() as conn:
        items, last = await conflict_store.page(
            conn,
            status=args.status,
            severity=args.severity,
            entity_type=args.entity_type,
            below_id=below,
            limit=args.limit,
        )
    return {"items": items, "next_cursor": None if last is None else encode_cursor(last)}


class GetArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: ConflictId


async def cmd_get(services: Services, args: GetArgs, _progress: Progress) -> dict[str, Any]:
    async with services.engine.connect() as conn:
        record = await conflict_store.get(conn, args.conflict_id)
    if record is None:
        raise CommandError(Code.INVALID_ARGS, f"no conflict {args.conflict_id!r}", "conflict_id")
    return record


class ResolveArgs(msgspec.Struct, forbid_unknown_fields=True):
    conflict_id: ConflictId
    winner_op_id: Annotated[str, Meta(min_length=1, max_length=64)]
    by: Annotated[str, Meta(min_length=1, max_length=128)]


async def cmd_resolve(services: Services, args: ResolveArgs, _progress: Progress) -> dict[str, Any]:
    """Resolve an open conflict; the record and `conflict.resolved` commit together."""
    now_us = time.time_ns() // 1000
    root = services.settings.mqtt.topic_root
    try:
        async with services.engine.begin() as conn:
            record = await conflict_store.resolve(
                conn, args.conflict_id, args.winner_op_id, args.by, now_us, root
            )
    except conflict_store.ResolveError as exc:
        path = "winner_op_id" if exc.reason == "not_in_pair" else "conflict_id"
        raise CommandError(Code.INVALID_ARGS, str(exc), path) from None
    services.metrics.conflicts_resolved.inc()
    services.outbox.poke()
    return record


class StatsArgs(msgspec.Struct, forbid_unknown_fields=True):
    since: AwareTime | None = None
    group_by: Literal["entity_type", "severity", "user_id", "hour"] = "severity"


async def cmd_stats(services: Services, args: StatsArgs, _progress: Progress) -> dict[str, Any]:
    since = None if args.since is None else _us(args.since)
    async with services.engine.connect() as conn:
        return await conflict_store.stats(conn, since, args.group_by, time.time_ns() // 1000)


TABLE: dict[str, Command] = {
    "conflicts/list": Command(cmd_list, ListArgs),
    "conflicts/get": Command(cmd_get, GetArgs),
    "conflicts/resolve": Command(cmd_resolve, ResolveArgs),
    "conflicts/stats": Command(cmd_stats, StatsArgs),
}
