"""The quarantine: every rejected payload, raw, with its topic, time and error.

It is where refused data goes, so it must never be refused itself: its text
columns hold what a device sent (a topic, an unknown field's name echoed in the
error and its path), and that text is made storable here, whatever it holds.
The raw payload, bytes, is kept exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog
from sqlalchemy import Column, String, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.records import QuarantineRecord
from storage.schema import quarantine

log = structlog.get_logger("fieldgate.quarantine")

NUL = "\x00"
NUL_SHOWN = "\\x00"
"""PostgreSQL text cannot hold NUL: it is written as Python and msgspec show it."""


def _length(column: Column[Any]) -> int | None:
    return column.type.length if isinstance(column.type, String) else None


_TOPIC = _length(quarantine.c.topic)
_DEVICE_ID = _length(quarantine.c.device_id)
_PATH = _length(quarantine.c.path)


def storable(text: str | None, length: int | None = None) -> str | None:
    """`text` without NUL and cut to the column's `length`: what every database takes."""
    if text is None:
        return None
    if NUL in text:
        text = text.replace(NUL, NUL_SHOWN)
    return text if length is None else text[:length]


async def store(conn: AsyncConnection, records: Sequence[QuarantineRecord]) -> None:
    if not records:
        return
    await conn.execute(
        quarantine.insert(),
        [
            {
                "received_at": r.received_at_us,
                "topic": storable(r.topic, _TOPIC),
                "device_id": storable(r.device_id, _DEVICE_ID),
                "kind": r.kind,
                "code": r.code,
                "message": storable(r.message),
                "path": storable(r.path, _PATH),
                "payload": r.payload,
                "payload_bytes": r.payload_bytes,
            }
            for r in records
        ],
    )


async def page(conn: AsyncConnection, below_id: int | None, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` rows, newest first, below `below_id` (a keyset page)."""
    query = select(quarantine).order_by(quarantine.c.id.desc()).limit(limit)
    if below_id is not None:
        query = query.where(quarantine.c.id < below_id)
    return [dict(row) for row in (await conn.execute(query)).mappings()]


async def prune(
    engine: AsyncEngine,
    received_before_us: int,
    limit: int,
    keep_at_most: int,
    on_full: Callable[[int], object] = lambda _dropped: None,
) -> int:
    """Delete up to `limit` of the oldest rows, those received before
    `received_before_us` and those past the newest `keep_at_most`, in a transaction of
    their own. Returns how many went.

    The oldest rows are found by id, in the order they were stored (the primary
    key, no index on `received_at` to keep up for this): a round looks at the first
    `limit` and takes those old enough. Rows come in nearly in `received_at` order,
    so one that is not old yet ends the round, and waits for the next. Ids only
    grow, so the rows at or below the newest id less `keep_at_most` are over the
    bound, whatever their age: `on_full` is told how many went for that.
    """
    async with engine.begin() as conn:
        newest = (await conn.execute(select(func.max(quarantine.c.id)))).scalar()
        over_up_to = (newest or 0) - keep_at_most
        oldest = await conn.execute(
            select(quarantine.c.id, quarantine.c.received_at).order_by(quarantine.c.id).limit(limit)
        )
        ids: list[int] = []
        for row_id, received_at in oldest:
            if received_at >= received_before_us and row_id > over_up_to:
                break
            ids.append(row_id)
        if ids:
            await conn.execute(quarantine.delete().where(quarantine.c.id.in_(ids)))
    dropped = sum(1 for row_id in ids if row_id <= over_up_to)
    if dropped:
        on_full(dropped)
        log.warning(
            "the quarantine is full: its oldest rows go before their retention",
            deleted=dropped,
            max_rows=keep_at_most,
        )
    return len(ids)
