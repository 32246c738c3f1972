"""What tables keep only for a while, on a real database (SQLite and PostgreSQL).

The outbox (`outbox.retention_s`): published rows go once they are that old;
pending rows stay. Rows published long ago, published just now, and never
published (an MQTT message not yet PUBACKed); only the first kind goes, in batches
of BATCH, and a full batch asks for the next round at once.

The quarantine (`quarantine.retention_s`): refused payloads go once they were
received that long ago, oldest first; the others stay, raw, to recover from.
"""

from __future__ import annotations

import time

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import retention
from gateway.retention import Retention
from storage import migrate
from storage import outbox as outbox_rows
from storage import quarantine as quarantine_rows
from storage.db import create_engine
from storage.schema import outbox, quarantine, webhook_deliveries
from tests.test_outbox_loops import HOUR_US, row


def cleanup_of_outbox(database: AsyncEngine, retention_s: float) -> Retention:
    return Retention("outbox-cleanup", database, lambda: retention_s, outbox_rows.prune)


async def test_published_rows_older_than_the_retention_go(db_url: str) -> None:
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    now = time.time_ns() // 1000
    try:
        async with database.begin() as conn:
            await conn.execute(
                insert(outbox),
                [row(n, now - 3 * HOUR_US) for n in range(5)]  # published 3 h ago
                + [row(n, now - 60_000_000) for n in range(5, 8)]  # a minute ago
                + [row(n, None) for n in range(8, 10)],  # not yet published
            )
        cleanup = cleanup_of_outbox(database, 3600.0)
        assert await cleanup.round() == retention.EVERY_S
        assert cleanup.deleted == 5
        async with database.connect() as conn:
            left = await conn.execute(select(outbox.c.topic).order_by(outbox.c.id))
            assert [topic for (topic,) in left] == [f"t/{n}" for n in range(5, 10)]
        # a shorter retention (config/reload) takes the minute-old rows on the next round
        cleanup.retention_s = lambda: 30.0
        await cleanup.round()
        async with database.connect() as conn:
            left = await conn.execute(select(outbox.c.topic).order_by(outbox.c.id))
            assert [topic for (topic,) in left] == ["t/8", "t/9"]
    finally:
        await database.dispose()


async def test_a_full_batch_asks_for_the_next_round_at_once(db_url: str) -> None:
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    old = time.time_ns() // 1000 - 3 * HOUR_US
    try:
        async with database.begin() as conn:
            await conn.execute(insert(outbox), [row(n, old) for n in range(retention.BATCH + 1)])
        cleanup = cleanup_of_outbox(database, 3600.0)
        assert await cleanup.round() == 0
        assert await cleanup.round() == retention.EVERY_S
        assert cleanup.deleted == retention.BATCH + 1
        async with database.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(outbox))).scalar() == 0
    finally:
        await database.dispose()


async def test_a_webhook_event_stays_while_a_delivery_names_it(db_url: str) -> None:
    """A delivery's body is its event's outbox row (storage/webhook_deliveries.py): the
    row of an event still being retried (or spooled dead) outlives the retention; its
    deliveries gone, it goes at the next round."""
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    old = time.time_ns() // 1000 - 3 * HOUR_US
    try:
        async with database.begin() as conn:
            added = insert(outbox).returning(outbox.c.id)
            ids = [
                (await conn.execute(added, row(n, old, "webhook"))).scalar_one() for n in range(3)
            ]
            await conn.execute(
                insert(webhook_deliveries),
                [
                    {"outbox_id": ids[1], "event_id": f"msg_{n}", "endpoint": endpoint}
                    | {"due_at": old, "attempts": 2, "url": "http://hooks.example/"}
                    for n, endpoint in enumerate(("ops", "audit"))
                ],
            )
        cleanup = cleanup_of_outbox(database, 3600.0)
        await cleanup.round()
        async with database.connect() as conn:
            left = await conn.execute(select(outbox.c.id))
            assert [row_id for (row_id,) in left] == [ids[1]]
        async with database.begin() as conn:
            await conn.execute(webhook_deliveries.delete())
        await cleanup.round()
        assert cleanup.deleted == 3
    finally:
        await database.dispose()


def refused(n: int, received_at: int) -> dict[str, object]:
    return {
        "received_at": received_at,
        "topic": f"fieldgate/devices/d{n}/sync",
        "device_id": f"d{n}",
        "kind": "sync",
        "code": "malformed",
        "message": "not JSON",
        "path": None,
        "payload": b"\xff" * n,
        "payload_bytes": n,
    }


def cleanup_of_quarantine(
    database: AsyncEngine,
    retention_s: float,
    max_rows: int = 1_000_000,
    dropped: list[int] | None = None,
) -> Retention:
    """The daemon's quarantine cleanup (gateway/daemon.py); `dropped` gets what each
    round deleted for the bound (the daemon counts it in a metric)."""
    told = dropped if dropped is not None else []
    return Retention(
        "quarantine-cleanup",
        database,
        lambda: retention_s,
        lambda engine, before_us, limit: quarantine_rows.prune(
            engine, before_us, limit, max_rows, told.append
        ),
    )


async def test_refused_payloads_older_than_the_retention_go_and_the_rest_stay(db_url: str) -> None:
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    now = time.time_ns() // 1000
    try:
        async with database.begin() as conn:
            await conn.execute(
                insert(quarantine),
                [refused(n, now - 40 * 24 * HOUR_US) for n in range(3)]  # 40 days ago
                + [refused(n, now - 2 * HOUR_US) for n in range(3, 5)],  # 2 hours ago
            )
        cleanup = cleanup_of_quarantine(database, 30 * 86400.0)
        assert await cleanup.round() == retention.EVERY_S
        assert cleanup.deleted == 3
        async with database.connect() as conn:
            left = await conn.execute(
                select(quarantine.c.device_id, quarantine.c.payload).order_by(quarantine.c.id)
            )
            assert [(d, p) for d, p in left] == [("d3", b"\xff" * 3), ("d4", b"\xff" * 4)]
        # a retention shortened by a reload takes the others at the next round
        cleanup.retention_s = lambda: 3600.0
        await cleanup.round()
        async with database.connect() as conn:
            count = await conn.execute(select(func.count()).select_from(quarantine))
            assert count.scalar() == 0
    finally:
        await database.dispose()


async def test_a_quarantine_backlog_goes_a_batch_a_round_and_stops_at_the_first_young_row(
    db_url: str,
) -> None:
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    now = time.time_ns() // 1000
    old = now - 40 * 24 * HOUR_US
    try:
        async with database.begin() as conn:
            await conn.execute(
                insert(quarantine),
                [refused(1, old) for _ in range(retention.BATCH + 2)]
                + [refused(2, now)]  # young: it ends the round ...
                + [refused(3, old)],  # ... and this one waits behind it
            )
        cleanup = cleanup_of_quarantine(database, 30 * 86400.0)
        assert await cleanup.round() == 0  # a full batch: again at once
        assert await cleanup.round() == retention.EVERY_S
        assert cleanup.deleted == retention.BATCH + 2
        async with database.connect() as conn:
            left = await conn.execute(select(quarantine.c.device_id).order_by(quarantine.c.id))
            assert [d for (d,) in left] == ["d2", "d3"]
    finally:
        await database.dispose()


async def test_past_max_rows_the_oldest_go_before_their_retention(db_url: str) -> None:
    """A flood of refused payloads cannot fill the disk: the newest `max_rows` stay,
    whatever their age; under the bound, only age counts again."""
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    now = time.time_ns() // 1000
    try:
        async with database.begin() as conn:
            await conn.execute(insert(quarantine), [refused(n, now) for n in range(15)])
        dropped: list[int] = []
        cleanup = cleanup_of_quarantine(database, 30 * 86400.0, max_rows=10, dropped=dropped)
        assert await cleanup.round() == retention.EVERY_S
        assert cleanup.deleted == 5
        assert dropped == [5]
        async with database.connect() as conn:
            left = await conn.execute(select(quarantine.c.device_id).order_by(quarantine.c.id))
            assert [d for (d,) in left] == [f"d{n}" for n in range(5, 15)]
        await cleanup.round()
        assert cleanup.deleted == 5
        assert dropped == [5]
    finally:
        await database.dispose()
