"""Fan-out and the deliveries' claim (SQLite and PostgreSQL): in order, and with
`only`, of those event types alone, which is what fan-out and a lane take while the
intake drains a backlog (crises at once, the rest waiting)."""

from __future__ import annotations

from handlers import webhooks
from handlers.records import OutboxRecord
from storage import outbox, webhook_deliveries
from storage.db import create_engine
from storage.migrate import upgrade_async
from storage.webhook_deliveries import Target

NOW = 1_796_000_000_000_000
TYPES = ["conflict.detected", "alert.crisis", "conflict.updated", "alert.crisis.escalated"]


async def test_a_claim_of_only_crisis_events_leaves_the_others_waiting(db_url: str) -> None:
    await upgrade_async(db_url)
    database = create_engine(db_url)
    try:
        async with database.begin() as conn:
            await outbox.add(
                conn,
                [
                    OutboxRecord(channel="webhook", event_type=kind, payload=b'{"n": %d}' % n)
                    for n, kind in enumerate(TYPES * 3)
                ],
                NOW,
            )
        targets = {kind: [Target("ops", "http://hooks.example/in", 0)] for kind in TYPES}
        taken, added = await webhook_deliveries.fan_out(
            database, targets, 100, NOW, only=webhooks.URGENT_EVENTS
        )
        assert (taken, added) == (6, {"ops": set(webhooks.URGENT_EVENTS)})
        taken, added = await webhook_deliveries.fan_out(database, targets, 100, NOW)
        assert (taken, added) == (6, {"ops": {"conflict.detected", "conflict.updated"}})
        urgent = await webhook_deliveries.claim(
            database, "ops", 100, NOW + 1, 60_000_000, only=webhooks.URGENT_EVENTS
        )
        assert [d.event_type for d in urgent] == [
            "alert.crisis", "alert.crisis.escalated"
        ] * 3  # fmt: skip
        rest = await webhook_deliveries.claim(database, "ops", 100, NOW + 1, 60_000_000)
        assert [d.event_type for d in rest] == ["conflict.detected", "conflict.updated"] * 3
        assert await webhook_deliveries.claim(database, "ops", 100, NOW + 1, 60_000_000) == []
    finally:
        await database.dispose()
