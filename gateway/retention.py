"""Deletes what a table has kept long enough, a batch at a time.

Two tables grow with the traffic and are only worth keeping for a while: the
outbox's published rows (`outbox.retention_s`: an operator may want to see what
went out, and when) and the quarantine (`quarantine.retention_s`: the raw copy of
what was refused, to recover a device's data from). Each gets a `Retention` loop;
a full batch asks for the next round at once, so a backlog of old rows goes in
short transactions that never hold the writer up for long.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.lifecycle import Loop
from handlers.times import now_us

log = structlog.get_logger("fieldgate.retention")

BATCH = 1000
EVERY_S = 60.0

Prune = Callable[[AsyncEngine, int, int], Awaitable[int]]
"""`prune(database, before_us, limit)`: deletes up to `limit` rows older than
`before_us`, oldest first, in a transaction of its own; returns how many went."""


class Retention(Loop):
    def __init__(
        self, name: str, database: AsyncEngine, retention_s: Callable[[], float], prune: Prune
    ) -> None:
        super().__init__()
        self.name = name
        self.database = database
        self.retention_s = retention_s
        """Read each round: a config reload applies at the next."""
        self.prune = prune
        self.deleted = 0

    async def round(self) -> float:
        before_us = now_us() - int(self.retention_s() * 1_000_000)
        gone = await self.prune(self.database, before_us, BATCH)
        self.deleted += gone
        if gone:
            log.debug("rows past their retention deleted", part=self.name, rows=gone)
        return 0 if gone == BATCH else EVERY_S
