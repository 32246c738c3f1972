"""The transactional outbox: written with its cause, sent after, marked on PUBACK.

A broker outage or a restart delays a notice and never loses it: the row stays
unsent until the broker acknowledged it. Rows are leased (`claimed_until`) so
that instances sharing a database do not all publish the same row, and a lease
that lapses (its instance died) lets another instance take the row over.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.records import OutboxRecord
from storage import driver
from storage.schema import outbox, webhook_deliveries


def topics(row: Mapping[Any, Any]) -> list[str]:
    """Every topic a row's payload goes to: its own and those it is copied to."""
    also: list[str] = msgspec.json.decode(row["also_to"]) if row["also_to"] else []
    return [row["topic"], *also]


def _row(record: OutboxRecord, now_us: int, claimed_until: int | None) -> dict[str, Any]:
    return {
        "channel": record.channel,
        "topic": record.topic,
        "also_to": msgspec.json.encode(record.also_to).decode() if record.also_to else None,
        "event_type": record.event_type,
        "payload": record.payload,
        "qos": record.qos,
        "retain": int(record.retain),
        "created_at": now_us,
        "attempts": 0 if claimed_until is None else 1,
        "claimed_until": claimed_until,
        "sent_at": None,
        "origin_at": record.origin_at_us,
    }


async def add(conn: AsyncConnection, records: Sequence[OutboxRecord], now_us: int) -> None:
    """Rows for the publisher's next claim (each writer's batch and detection pass)."""
    rows = [_row(r, now_us, None) for r in records]
    await driver.execute_many(conn, _INSERT, [[row[c] for c in _COLUMNS] for row in rows])


_COLUMNS = tuple(c.name for c in outbox.c if c.name != "id")
_INSERT = (
    f"INSERT INTO outbox ({', '.join(_COLUMNS)})"  # noqa: S608 - constant names
    f" VALUES ({', '.join('?' * len(_COLUMNS))})"
)


async def add_leased(
    conn: AsyncConnection, records: Sequence[OutboxRecord], now_us: int, lease_us: int
) -> list[dict[str, Any]]:
    """Add rows already leased to the caller, who publishes them right after the commit.

    The fast path for what cannot wait (crisis alerts): no claiming transaction
    between the commit and the publish. If the caller fails or dies, the lease
    lapses and the ordinary rounds (of any instance) take the rows over.
    """
    if not records:
        return []
    rows = [_row(r, now_us, now_us + lease_us) for r in records]
    result = await conn.execute(
        outbox.insert().returning(outbox.c.id, sort_by_parameter_order=True), rows
    )
    ids = [row_id for (row_id,) in result]
    return [{**row, "id": row_id} for row, row_id in zip(rows, ids, strict=True)]


async def claim(
    autocommit: AsyncEngine, channel: str, limit: int, now_us: int, lease_us: int
) -> list[dict[str, Any]]:
    """Lease up to `limit` unsent rows, oldest first, and return them.

    One statement on an engine whose statements commit themselves
    (`storage.db.autocommit_twin`): on SQLite the write lock is held while SQLite runs
    it, not across the event loop's turns between the statements of a transaction,
    during which the engine's writer waited (SQLite's busy wait sleeps 1, 2, 5 ms...:
    six collisions a second at 2,000 ops/s, in the ack's p99)."""
    due = (
        select(outbox.c.id)
        .where(
            outbox.c.channel == channel,
            outbox.c.sent_at.is_(None),
            or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until < now_us),
        )
        .order_by(outbox.c.id)
        .limit(limit)
    )
    if autocommit.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    leased = (
        update(outbox)
        .where(outbox.c.id.in_(due))
        .values(claimed_until=now_us + lease_us, attempts=outbox.c.attempts + 1)
        .returning(*outbox.c)
    )
    async with autocommit.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(leased)).mappings()]
    return sorted(rows, key=lambda row: row["id"])


async def mark_sent(autocommit: AsyncEngine, ids: Sequence[int], now_us: int) -> None:
    """One statement in autocommit, as `claim`."""
    if not ids:
        return
    async with autocommit.connect() as conn:
        await conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(sent_at=now_us))


async def release(
    engine: AsyncEngine, ids: Sequence[int], left: Mapping[int, Sequence[str]] | None = None
) -> None:
    """Give rows back at once (a failed publish), so the next round retries them; a row
    in `left` only to the topics named there (the others had their PUBACK)."""
    if not ids:
        return
    async with engine.begin() as conn:
        for row_id, topics_left in (left or {}).items():
            first, *also = topics_left
            also_to = msgspec.json.encode(also).decode() if also else None
            await conn.execute(
                update(outbox).where(outbox.c.id == row_id).values(topic=first, also_to=also_to)
            )
        await conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(claimed_until=None))


async def depth(conn: AsyncConnection, channel: str) -> int:
    result = await conn.execute(
        select(func.count())
        .select_from(outbox)
        .where(and_(outbox.c.channel == channel, outbox.c.sent_at.is_(None)))
    )
    return int(result.scalar_one())


async def prune(engine: AsyncEngine, sent_before_us: int, limit: int) -> int:
    """Delete up to `limit` rows published before `sent_before_us`, oldest first, in a
    transaction of their own (short: the writer's commits do not wait behind it).
    A webhook event stays while a delivery names it (its body is the event's payload:
    storage/webhook_deliveries.py). Returns how many went."""
    async with engine.begin() as conn:
        named = select(webhook_deliveries.c.id).where(webhook_deliveries.c.outbox_id == outbox.c.id)
        old = (
            select(outbox.c.id)
            .where(
                outbox.c.sent_at.is_not(None),
                outbox.c.sent_at < sent_before_us,
                ~named.exists(),
            )
            .order_by(outbox.c.id)
            .limit(limit)
        )
        ids = [row_id for (row_id,) in await conn.execute(old)]
        if ids:
            await conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))
    return len(ids)
