"""The outbox's publisher on a real database (SQLite and PostgreSQL); its cleanup is
in tests/test_retention.py.

Publishing: when the broker takes nothing (its queue full, say), the publisher
retries after a pause, and does not spin on its own releases; crises go ahead of
what waits; a row leased at its commit whose PUBACK comes after the lease is
published once, not again by the rounds.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import insert, select

from gateway.outbound.outbox import FAILED_PAUSE_S, OutboxPublisher
from gateway.seam import Outbound
from handlers.records import OutboxRecord
from handlers.times import now_us
from storage import migrate
from storage import outbox as outbox_rows
from storage.db import create_engine
from storage.schema import outbox

HOUR_US = 3600 * 1_000_000


def row(n: int, sent_at: int | None, channel: str = "mqtt") -> dict[str, object]:
    return {
        "channel": channel,
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


class RefusingSession:
    """The session as the publisher uses it, connected, with a broker that takes nothing."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.attempts = 0

    async def publish_confirmed(self, _message: Outbound, *, ahead: bool = False) -> bool:
        self.attempts += 1
        return False


async def test_failed_publishes_are_retried_after_a_pause_not_at_once(db_url: str) -> None:
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    try:
        async with database.begin() as conn:
            await conn.execute(insert(outbox), [row(1, None)])
        session = RefusingSession()
        publisher = OutboxPublisher(database, session, lease_s=0.001)  # type: ignore[arg-type]
        task = asyncio.create_task(publisher.run())
        await asyncio.sleep(1.0)
        task.cancel()
        # one attempt per pause (5 in a second), not one per round trip (thousands)
        assert 1 <= session.attempts <= 1.0 / FAILED_PAUSE_S + 2, session.attempts
        # (The cancel may fall between an attempt and its count.)
        assert session.attempts - 1 <= publisher.failed <= session.attempts
        async with database.connect() as conn:
            left = await conn.execute(select(outbox.c.sent_at))
            assert [sent for (sent,) in left] == [None]
    finally:
        await database.dispose()


class RecordingSession:
    """The session as the publisher uses it, connected; it takes everything."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[tuple[str, bool]] = []

    async def publish_confirmed(self, message: Outbound, *, ahead: bool = False) -> bool:
        self.published.append((message.topic, ahead))
        return True


async def test_crises_are_published_ahead_of_what_waits_in_the_session(db_url: str) -> None:
    """Crises and their escalations go before the session's other waiting messages;
    wellness notifications (leased at their commit like crises) and the rest do not."""
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    kinds = ["alert.wellness", "alert.crisis", "conflict.detected", "alert.crisis.escalated"]
    try:
        async with database.begin() as conn:
            await conn.execute(
                insert(outbox), [{**row(n, None), "event_type": k} for n, k in enumerate(kinds)]
            )
        session = RecordingSession()
        publisher = OutboxPublisher(database, session)  # type: ignore[arg-type]
        await publisher.round()
        assert sorted(session.published) == [
            ("t/0", False),
            ("t/1", True),
            ("t/2", False),
            ("t/3", True),
        ]
    finally:
        await database.dispose()


class SlowSession:
    """Connected; confirms each publication `after_s` after it (a broker behind)."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.connected = asyncio.Event()
        self.connected.set()
        self.published: list[str] = []

    async def publish_confirmed(self, message: Outbound, *, ahead: bool = False) -> bool:
        self.published.append(message.topic)
        await asyncio.sleep(self.after_s)
        return True


async def test_a_leased_row_is_published_once_when_its_puback_comes_after_its_lease(
    db_url: str,
) -> None:
    """A commit leases its urgent rows to its process for a short while (the writer's
    DIRECT_LEASE_US); in a flood the PUBACK comes later than that, and the rounds,
    which take rows whose lease lapsed, published the row a second time."""
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    try:
        record = OutboxRecord(
            channel="mqtt", topic="t/wellness", event_type="alert.wellness", payload=b"{}"
        )
        async with database.begin() as conn:
            leased = await outbox_rows.add_leased(conn, [record], now_us(), 200_000)
        session = SlowSession(after_s=1.0)
        publisher = OutboxPublisher(database, session, poll_s=0.05)  # type: ignore[arg-type]
        rounds = asyncio.create_task(publisher.run())
        publisher.publish_leased(leased)
        await asyncio.sleep(1.5)
        rounds.cancel()
        await publisher.stop()
        assert session.published == ["t/wellness"]
        assert publisher.published == 1
        async with database.connect() as conn:
            sent = await conn.execute(select(outbox.c.sent_at))
            assert [at is not None for (at,) in sent] == [True]
    finally:
        await database.dispose()
