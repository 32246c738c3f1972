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

from storage import alerts, outbox, quarantine, sync_log
from storage.alerts import AlertPolicy
from storage.records import (
    AlertRecord,
    CrisisAckRecord,
    OpRecord,
    OutboxRecord,
    QuarantineRecord,
)

log = structlog.get_logger("fieldgate.writer")


class WriteSet(msgspec.Struct):
    """Everything one batch writes, gathered from many messages."""

    ops: list[OpRecord] = msgspec.field(default_factory=list)
    quarantine: list[QuarantineRecord] = msgspec.field(default_factory=list)
    outbox: list[OutboxRecord] = msgspec.field(default_factory=list)
    alerts: list[AlertRecord] = msgspec.field(default_factory=list)
    crisis_acks: list[CrisisAckRecord] = msgspec.field(default_factory=list)


class Committed(msgspec.Struct):
    """What a commit wrote to the outbox: how many rows, and those leased to the caller
    for publication at once (see `outbox.add_leased`)."""

    outbox_rows: int = 0
    leased: list[dict[str, Any]] = msgspec.field(default_factory=list)


DIRECT_LEASE_US = 5_000_000
"""How long the rows of the fast path stay leased to the instance that wrote them."""


class Writer:
    """Commits write sets; `healthy` is False while the database refuses them."""

    def __init__(self, engine: AsyncEngine, alert_policy: AlertPolicy | None = None) -> None:
        self.engine = engine
        self.alert_policy = alert_policy or AlertPolicy()
        self.healthy = True
        self.last_error: str | None = None
        self.commits = 0

    async def commit(self, batch: WriteSet) -> Committed:
        """Commit `batch`; returns what it wrote to the outbox (the publisher's cue)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((OperationalError, DBAPIError)),
            wait=wait_exponential_jitter(initial=0.05, max=5.0),
            before_sleep=lambda state: self._failed(state, len(batch.ops)),
            reraise=True,
        )
        written = Committed()
        async for attempt in retrying:
            with attempt:
                _reset(batch.ops)
                alerts.reset(batch.alerts, batch.crisis_acks)
                written = await self._transaction(batch)
        self.healthy = True
        self.last_error = None
        self.commits += 1
        return written

    async def _transaction(self, batch: WriteSet) -> Committed:
        now_us = time.time_ns() // 1000
        async with self.engine.begin() as conn:
            await sync_log.store_ops(conn, batch.ops, now_us)
            caused = await alerts.store_alerts(conn, batch.alerts, now_us, self.alert_policy)
            await alerts.acknowledge(conn, batch.crisis_acks, now_us)
            await quarantine.store(conn, batch.quarantine)
            # What alerts cause is published by the caller right after the commit,
            # without waiting for the publisher's next claim.
            direct = [r for r in caused if r.channel == "mqtt"]
            leased = await outbox.add_leased(conn, direct, now_us, DIRECT_LEASE_US)
            await outbox.add(conn, [r for r in caused if r.channel != "mqtt"], now_us)
            await outbox.add(conn, batch.outbox, now_us)
        return Committed(len(batch.outbox) + len(caused), leased)

    def _failed(self, state: RetryCallState, ops: int) -> None:
        self.healthy = False
        exc = state.outcome.exception() if state.outcome else None
        self.last_error = type(exc).__name__ if exc else "unknown"
        log.warning(
            "commit failed, retrying",
            error=self.last_error,
            # The first line only: PostgreSQL's DETAIL may quote a failing row, and a
            # row of `alerts` holds a person's note.
            detail=str(getattr(exc, "orig", exc)).partition("\n")[0][:200],
            attempt=state.attempt_number,
            ops=ops,
        )


def _reset(records: Sequence[OpRecord]) -> None:
    for record in records:
        record.status = "pending"
        record.version = None
