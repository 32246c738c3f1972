"""Escalation of unacknowledged crisis alerts, driven by the schedule in the database.

The schedule is a column (`alerts.next_escalation_at`), not a timer in memory: a
restart picks up where the last process stopped, and several instances may run
this loop on one database: each escalation is claimed by exactly one of them
(storage/alerts.py, `escalate_due`), in the same transaction as its outbox rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.lifecycle import Loop
from gateway.metrics import Metrics
from handlers.times import now_us
from storage import alerts
from storage.alerts import AlertStep

log = structlog.get_logger("fieldgate.escalation")

GAUGE_EVERY_S = 5.0


class Escalator(Loop):
    """Sleeps until the next escalation is due (at most `poll_s`), then escalates.

    The policy and the notices are the alert step's own, so a reload reaches both.
    """

    name = "escalation"

    def __init__(
        self,
        engine: AsyncEngine,
        alert_step: AlertStep,
        metrics: Metrics,
        on_outbox: Callable[[], None],
        poll_s: Callable[[], float],
    ) -> None:
        super().__init__()
        self.engine = engine
        self.alert_step = alert_step
        self.metrics = metrics
        self.on_outbox = on_outbox
        self.poll_s = poll_s
        self._gauge_at = 0.0

    def poke(self) -> None:
        """A crisis was stored or acknowledged: look at the schedule (and count) again."""
        self._gauge_at = 0.0
        super().poke()

    async def round(self) -> float:
        """Escalate what is due; return how long to sleep before the next look."""
        now = now_us()
        async with self.engine.connect() as conn:
            due = await alerts.next_due(conn)
            if time.monotonic() >= self._gauge_at:
                self.metrics.open_crises.set(await alerts.open_crises(conn))
                self._gauge_at = time.monotonic() + GAUGE_EVERY_S
        if due is not None and due <= now:
            step = self.alert_step
            async with self.engine.begin() as conn:
                done, rows = await alerts.escalate_due(conn, now, step.policy, step.notices)
            for alert_id, level in done:
                self.metrics.escalations.inc()
                log.warning("crisis escalated", alert_id=alert_id, escalation=level)
            if rows:
                self.on_outbox()
            async with self.engine.connect() as conn:
                due = await alerts.next_due(conn)
        poll = self.poll_s()
        if due is None:
            return poll
        return max(0.01, min(poll, (due - now_us()) / 1e6))
