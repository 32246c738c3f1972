"""Deletes what the outbox has published, once `outbox.retention_s` has passed.

A published row is kept for a while (an operator may want to see what went out,
and when), then goes, a batch at a time, so that the table does not grow with
every message the gateway ever sent.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.lifecycle import Loop
from handlers.times import now_us
from storage import outbox

log = structlog.get_logger("fieldgate.outbox")

BATCH = 1000
EVERY_S = 60.0


class OutboxCleanup(Loop):
    name = "outbox-cleanup"

    def __init__(self, database: AsyncEngine, retention_s: Callable[[], float]) -> None:
        super().__init__()
        self.database = database
        self.retention_s = retention_s
        self.deleted = 0

    async def round(self) -> float:
        before_us = now_us() - int(self.retention_s() * 1_000_000)
        gone = await outbox.prune(self.database, before_us, BATCH)
        self.deleted += gone
        if gone:
            log.debug("outbox rows deleted", rows=gone)
        return 0 if gone == BATCH else EVERY_S
