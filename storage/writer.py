"""The writer: many messages, one transaction, retried until it commits.

Group commit is what makes durable acks affordable: one fsync (SQLite) or one
round of WAL flush (PostgreSQL) per batch instead of per message. A batch that
fails is rolled back whole and tried again with backoff; nothing is acked until
the retry commits, so a database outage delays acks and never loses an operation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from storage import outbox, quarantine, sync_log
from storage.conflicts import Detector
from storage.records import OpRecord, OutboxRecord, QuarantineRecord

log = structlog.get_logger("fieldgate.writer")


class WriteSet(msgspec.Struct):
    """Everything one batch writes, gathered from many messages."""

    ops: list[OpRecord] = msgspec.field(default_factory=list)
    quarantine: list[QuarantineRecord] = msgspec.field(default_factory=list)
    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)
    conflicts: list[dict[str, Any]] = msgspec.field(default_factory=list)
    """Filled by the writer: the conflict records the committed batch created."""


class Writer:
    """Commits write sets; `healthy` is False while the database refuses them."""

    def __init__(self, engine: AsyncEngine, detector: Detector | None = None) -> None:
        self.engine = engine
        self.detector = detector
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0

    async def commit(self, batch: WriteSet) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((OperationalError, DBAPIError)),
            wait=wait_exponential_jitter(initial=0.05, max=5.0),
            before_sleep=lambda state: self._failed(state, len(batch.ops)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                _reset(batch.ops)
                batch.conflicts = []
                try:
                    await self._transaction(batch)
                except BaseException:
                    if self.detector is not None:
                        self.detector.failed()
                    raise
                if self.detector is not None:
                    self.detector.committed()
        self.healthy = True
        self.last_error = None
        self.commits += 1

    async def _transaction(self, batch: WriteSet) -> None:
        now_us = time.time_ns() // 1000
        async with self.engine.begin() as conn:
            prior = await sync_log.store_ops(conn, batch.ops, now_us)
            if self.detector is not None:
                batch.conflicts = await self.detector.run(conn, batch.ops, now_us, prior)
            await quarantine.store(conn, batch.quarantine)
            await outbox.add(conn, batch.outbox, now_us)

    def _failed(self, state: RetryCallState, ops: int) -> None:
        self.healthy = False
        exc = state.outcome.exception() if state.outcome else None
        self.last_error = type(exc).__name__ if exc else "unknown"
        log.warning(
            "commit failed, retrying",
            error=self.last_error,
            detail=str(getattr(exc, "orig", exc))[:200],
            attempt=state.attempt_number,
            ops=ops,
        )


def _reset(records: Sequence[OpRecord]) -> None:
    for record in records:
        record.status = "pending"
        record.version = None
