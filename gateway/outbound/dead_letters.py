"""Moves dead webhook deliveries from the database (the spool) to the DLQ in Redis.

A delivery dies in a database transaction (storage/webhook_deliveries.py), which
needs no Redis: while Redis is away, dead deliveries wait in the database and this
loop retries with backoff; when Redis is back they all move. An entry is written
to Redis before its row is deleted, under the id it got when it died, so a crash
in between writes the same key and index member again: none lost, none twice.

On its first round it adopts entries other producers wrote with the key pattern
alone (`dlq/reindex` does the same on demand).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import Settings
from gateway.lifecycle import Loop, backoff
from gateway.metrics import Metrics
from storage import dlq, webhook_deliveries

log = structlog.get_logger("fieldgate.dlq")

PAGE = 200
POLL_S = 5.0


class DeadLetters(Loop):
    name = "dead-letters"

    def __init__(
        self,
        database: AsyncEngine,
        redis: Redis,
        settings: Callable[[], Settings],
        metrics: Metrics,
    ) -> None:
        super().__init__()
        self.database = database
        self.redis = redis
        self.settings = settings
        self.metrics = metrics
        self.moved = 0
        self._adopted = False
        self._redis_failures = 0

    async def round(self) -> float:
        try:
            wait_s = await self._move()
        except RedisError as exc:
            self._redis_failures += 1
            wait_s = backoff(self._redis_failures, 1.0, 30.0)
            log.warning("redis unavailable; dead letters wait", error=type(exc).__name__)
            return wait_s
        if self._redis_failures:
            log.info("redis is back; dead letters move again")
            self._redis_failures = 0
        return wait_s

    async def _move(self) -> float:
        if not self._adopted:
            adopted = await dlq.reindex(self.redis)
            if adopted:
                log.info("dead-letter entries adopted", entries=adopted)
            self._adopted = True
        entries = await webhook_deliveries.spooled(self.database, PAGE)
        ttl_s = self.settings().dlq.ttl_s
        for entry in entries:
            await dlq.put(self.redis, entry, ttl_s)
        await webhook_deliveries.unspool(self.database, [entry.id for entry in entries])
        self.moved += len(entries)
        self.metrics.dlq_entries.set(await dlq.size(self.redis))
        return 0 if len(entries) == PAGE else POLL_S
