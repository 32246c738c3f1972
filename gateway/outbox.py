"""Publishes the outbox: every row until the broker acknowledges it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.mqtt import MqttSession, Outbound
from storage import outbox

log = structlog.get_logger("fieldgate.outbox")


class OutboxPublisher:
    """One loop: claim a page of unsent rows, publish them, mark what was PUBACKed.

    Woken by `poke()` after a commit that wrote rows, and every `poll_s` to take
    over rows whose lease lapsed (another instance died) or that failed before.
    """

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
        self.engine = engine
        self.session = session
        self.page = page
        self.lease_us = int(lease_s * 1_000_000)
        self.poll_s = poll_s
        self.on_sent = on_sent
        self.published = 0
        self.failed = 0
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.session.connected.wait()
            try:
                sent_all = await self._round()
            except DBAPIError as exc:
                log.warning("outbox round failed", error=type(exc).__name__)
                sent_all = False
            if sent_all:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            else:
                await asyncio.sleep(min(self.poll_s, 0.2))

    async def _round(self) -> bool:
        """Publish one page; True when there was nothing more to do."""
        rows = await outbox.claim(
            self.engine, "mqtt", self.page, time.time_ns() // 1000, self.lease_us
        )
        if not rows:
            return True
        messages = [
            Outbound(row["topic"], row["payload"], qos=row["qos"], retain=bool(row["retain"]))
            for row in rows
        ]
        results = await asyncio.gather(*(self.session.publish_confirmed(m) for m in messages))
        acked_us = time.time_ns() // 1000
        sent = [row["id"] for row, ok in zip(rows, results, strict=True) if ok]
        failed = [row["id"] for row, ok in zip(rows, results, strict=True) if not ok]
        if self.on_sent is not None and sent:
            self.on_sent([row for row, ok in zip(rows, results, strict=True) if ok], acked_us)
        await outbox.mark_sent(self.engine, sent, time.time_ns() // 1000)
        await outbox.release(self.engine, failed)
        self.published += len(sent)
        self.failed += len(failed)
        return not failed and len(rows) < self.page
