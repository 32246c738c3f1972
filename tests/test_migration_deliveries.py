"""Migration 0011 on a database whose deliveries carry their own bodies (SQLite and
PostgreSQL): each event gets an outbox row holding its payload, the deliveries name
it, and what the sender claims and the dead-letter queue spools is byte for byte
what was stored before; the downgrade gives the bodies back."""

from __future__ import annotations

import asyncio
import time

import msgspec
from alembic import command
from sqlalchemy import create_engine, text

from handlers import webhooks
from storage import migrate, webhook_deliveries
from storage.db import create_engine as create_async_engine

CRISIS = msgspec.json.encode({"alert_id": "a-1", "kind": "panic", "note": "ünïcode"})
UPDATED = msgspec.json.encode({"conflict": {"conflict_id": "c-1", "member_count": 2}})
CREATED_AT = 1_796_000_000_123_456


def delivery(n: int, event: str, endpoint: str, body: bytes, **more: object) -> dict[str, object]:
    return {
        "id": n,
        "event_id": event,
        "endpoint": endpoint,
        "event_type": "alert.crisis" if event == "msg_crisis" else "conflict.updated",
        "body": body,
        "created_at": CREATED_AT + n,
        "due_at": 0,
        "attempts": 1,
        "claimed_until": None,
        "first_attempt_at": None,
        "last_status": None,
        "last_error": None,
        "dead_at": None,
        "dlq_id": None,
        "url": "http://hooks.example/in",
    } | more


def rows() -> list[dict[str, object]]:
    crisis = webhooks.body("alert.crisis", CREATED_AT + 1, CRISIS)
    updated = webhooks.body("conflict.updated", CREATED_AT + 3, UPDATED)
    return [
        delivery(1, "msg_crisis", "ops", crisis),
        delivery(2, "msg_crisis", "audit", crisis, created_at=CREATED_AT + 1),
        delivery(3, "msg_updated", "ops", updated, dead_at=CREATED_AT + 9, dlq_id="dlq_1"),
    ]


def sync_url(url: str) -> str:
    return url.replace("+aiosqlite", "")


async def test_bodies_move_to_the_outbox_and_back(db_url: str) -> None:
    await migrate.upgrade_async(db_url, "0010")
    engine = create_engine(sync_url(db_url))
    before = rows()
    columns = list(before[0])
    with engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO webhook_deliveries ({', '.join(columns)})"
                f" VALUES ({', '.join(':' + c for c in columns)})"
            ),
            before,
        )
    await migrate.upgrade_async(db_url)

    with engine.connect() as conn:
        events = conn.execute(
            text(
                "SELECT id, channel, event_type, payload, created_at, sent_at FROM outbox"
                " ORDER BY id"
            )
        ).all()
        named = conn.execute(text("SELECT id, outbox_id FROM webhook_deliveries ORDER BY id")).all()
    crisis, updated = (row.id for row in events)
    assert [tuple(row)[1:] for row in events] == [
        ("webhook", "alert.crisis", CRISIS, CREATED_AT + 1, CREATED_AT + 1),
        ("webhook", "conflict.updated", UPDATED, CREATED_AT + 3, CREATED_AT + 3),
    ]
    assert [tuple(row) for row in named] == [(1, crisis), (2, crisis), (3, updated)]

    database = create_async_engine(db_url)
    try:
        now = time.time_ns() // 1000
        claimed = await webhook_deliveries.claim(database, "ops", 10, now, 60_000_000)
        assert [(d.id, d.event_id, d.event_type, d.body, d.created_at) for d in claimed] == [
            (1, "msg_crisis", "alert.crisis", before[0]["body"], CREATED_AT + 1)
        ]
        (entry,) = await webhook_deliveries.spooled(database, 10)
        assert (entry.id, entry.webhook, entry.event_type, entry.webhook_id) == (
            "dlq_1",
            "ops",
            "conflict.updated",
            "msg_updated",
        )
        assert bytes(entry.payload) == before[2]["body"]
    finally:
        await database.dispose()

    await asyncio.to_thread(command.downgrade, migrate._config(db_url), "0010")
    with engine.connect() as conn:
        back = conn.execute(
            text("SELECT id, event_type, body, created_at FROM webhook_deliveries ORDER BY id")
        ).all()
    engine.dispose()
    assert [tuple(row) for row in back] == [
        (1, "alert.crisis", before[0]["body"], CREATED_AT + 1),
        (2, "alert.crisis", before[1]["body"], CREATED_AT + 1),
        (3, "conflict.updated", before[2]["body"], CREATED_AT + 3),
    ]
