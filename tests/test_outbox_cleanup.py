"""`outbox.retention_s`: published rows go once they are that old; pending rows stay.

The cleanup loop's round on a real database (SQLite and PostgreSQL): rows
published long ago, published just now, and never published (a webhook still
retrying, an MQTT message not yet PUBACKed). Only the first kind goes, in
batches of BATCH, and a full batch asks for the next round at once.
"""

from __future__ import annotations

import time

from sqlalchemy import func, insert, select

from gateway.outbound import outbox_cleanup
from gateway.outbound.outbox_cleanup import OutboxCleanup
from storage import migrate
from storage.db import create_engine
from storage.schema import outbox

HOUR_US = 3600 * 1_000_000


def row(n: int, sent_at: int | None) -> dict[str, object]:
    return {
        "channel": "mqtt",
        "topic": f"t/{n}",
        "event_type": None,
        "payload": b"{}",
        "qos": 1,
        "retain": 0,
        "created_at": 0,
        "attempts": 0,
        "claimed_until": None,
        "sent_at": sent_at,
        "origin_at": None,
    }


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
        cleanup = OutboxCleanup(database, lambda: 3600.0)
        assert await cleanup.round() == outbox_cleanup.EVERY_S
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
            await conn.execute(
                insert(outbox), [row(n, old) for n in range(outbox_cleanup.BATCH + 1)]
            )
        cleanup = OutboxCleanup(database, lambda: 3600.0)
        assert await cleanup.round() == 0
        assert await cleanup.round() == outbox_cleanup.EVERY_S
        assert cleanup.deleted == outbox_cleanup.BATCH + 1
        async with database.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(outbox))).scalar() == 0
    finally:
        await database.dispose()
