"""Publishes the outbox: every row until the broker acknowledges it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.lifecycle import Loop
from gateway.mqtt.session import MqttSession
from gateway.seam import Outbound
from handlers.times import now_us
from storage import outbox
from storage.db import autocommit_twin

log = structlog.get_logger("fieldgate.outbox")

AHEAD_EVENTS = frozenset({"alert.crisis", "alert.crisis.escalated"})
"""Rows published ahead of everything else waiting in the priority session
(`MqttSession.publish_confirmed`): behind 50,000 admin requests and alerts queued at
once, the answers and wellness notifications before a crisis kept it waiting 10 s and
more (tests/test_huge_backlog.py)."""

FAILED_PAUSE_S = 0.2
"""After a round in which publishes failed, the next waits this long (unless a commit
pokes): the broker's queue may be full, and retrying at once would spin."""


class OutboxPublisher(Loop):
    """Rounds: claim a page of unsent rows, publish them, mark what was PUBACKed.

    Woken by `poke()` after a commit that wrote rows, and every `poll_s` to take
    over rows whose lease lapsed (another instance died) or that failed before.
    """

    name = "outbox"
    stop_timeout_s = 5.0

    def __init__(
        self,
        engine: AsyncEngine,
        session: MqttSession,
        *,
        page: int = 200,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        on_sent: Callable[[list[dict[str, Any]], int], None] | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.autocommit = autocommit_twin(engine)
        """Claims and marks are single statements that commit themselves
        (`storage.outbox.claim`)."""
        self.session = session
        self.page = page
        self.lease_us = int(lease_s * 1_000_000)
        self.poll_s = poll_s
        self.on_sent = on_sent
        self.published = 0
        self.failed = 0
        self._tasks: set[asyncio.Task[int]] = set()
        self._in_hand: set[int] = set()
        """Rows this process is publishing, until their PUBACKs or their release: a
        round that claims one (its commit's short lease lapsed while the broker was
        slow to acknowledge) leaves it to the publication under way."""

    def publish_leased(self, rows: list[dict[str, Any]]) -> None:
        """Publish rows leased to us by the commit that wrote them, at once.

        What fails is released for the ordinary rounds; if this process dies
        first, the lease lapses and any instance takes the rows over.
        """
        if not rows:
            return
        task = asyncio.create_task(self._publish_leased(rows), name="outbox:leased")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_leased(self, rows: list[dict[str, Any]]) -> int:
        failed = await self._publish(rows)
        if failed:
            self.poke()  # released: the ordinary rounds take them now
        return failed

    async def stop(self) -> None:
        """Let the leased publications under way finish (the drain's crisis alerts among
        them), so that what the broker acknowledged is marked sent."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.stop_timeout_s - 1)
        await self.autocommit.dispose()

    async def _publish_row(self, row: dict[str, Any]) -> list[str]:
        """Publish a row to each of its topics; the topics that did not confirm."""
        payload, qos, retain = row["payload"], row["qos"], bool(row["retain"])
        ahead = row["event_type"] in AHEAD_EVENTS
        topics = outbox.topics(row)
        messages = [Outbound(topic, payload, qos=qos, retain=retain) for topic in topics]
        confirmed = await asyncio.gather(
            *(self.session.publish_confirmed(m, ahead=ahead) for m in messages)
        )
        return [topic for topic, ok in zip(topics, confirmed, strict=True) if not ok]

    async def ready(self) -> None:
        await self.session.connected.wait()

    async def round(self) -> float:
        """Publish one page; at once again while there is more, else wait for a poke."""
        rows = await outbox.claim(self.autocommit, "mqtt", self.page, now_us(), self.lease_us)
        if not rows:
            return self.poll_s
        # In a flood the broker's PUBACKs come later than a commit's lease
        # (DIRECT_LEASE_US): the row would go out twice, into a broker already behind.
        ours = [row for row in rows if row["id"] not in self._in_hand]
        failed = await self._publish(ours) if ours else 0
        if failed:
            return min(self.poll_s, FAILED_PAUSE_S)
        return 0 if len(rows) == self.page else self.poll_s

    async def _publish(self, rows: list[dict[str, Any]]) -> int:
        """Publish claimed rows, each to all its topics; mark what was PUBACKed on every
        topic, release the rest, to the topics that did not confirm (at least once).
        Returns failures."""
        ids = {row["id"] for row in rows}
        self._in_hand |= ids
        try:
            return await self._publish_in_hand(rows)
        finally:
            self._in_hand -= ids

    async def _publish_in_hand(self, rows: list[dict[str, Any]]) -> int:
        unconfirmed = await asyncio.gather(*(self._publish_row(row) for row in rows))
        acked_us = now_us()
        sent = [row for row, left in zip(rows, unconfirmed, strict=True) if not left]
        failed = [row["id"] for row, left in zip(rows, unconfirmed, strict=True) if left]
        partly = {
            row["id"]: left
            for row, left in zip(rows, unconfirmed, strict=True)
            if left and len(left) < len(outbox.topics(row))
        }
        if self.on_sent is not None and sent:
            self.on_sent(sent, acked_us)
        try:
            await outbox.mark_sent(self.autocommit, [row["id"] for row in sent], now_us())
            await outbox.release(self.engine, failed, partly)
        except DBAPIError as exc:
            # The leases lapse: the rows are published again (at least once).
            log.warning("outbox bookkeeping failed", error=type(exc).__name__)
        if failed:
            log.warning(
                "outbox publishes not confirmed: released for the next round",
                count=len(failed),
                first_id=min(failed),
            )
        self.published += len(sent)
        self.failed += len(failed)
        return len(failed)
