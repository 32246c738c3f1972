"""The sync operations' share of the writer's transaction: store, then detect conflicts.

Conflict detection runs after `store_ops` in the same transaction, while the
version upsert holds every touched entity's row lock (storage/conflicts.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.records import OpRecord
from storage import sync_log
from storage.conflicts import Detector
from storage.writer import Step, Written


class SyncStep(Step):
    """Stores operations exactly once with their versions; the detector (when given)
    finds their conflicts and keeps the per-user and per-device counters. Its events
    are the detector's (`storage.conflicts.Detected`)."""

    record_type = OpRecord
    name = "ops"

    def __init__(self, detector: Detector | None = None) -> None:
        self.detector = detector

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        prior = await sync_log.store_ops(conn, records, now_us)
        if self.detector is None:
            return Written()
        detected = await self.detector.run(conn, records, now_us, prior)
        return Written(outbox=detected.outbox, events=detected.events)

    def committed(self) -> None:
        if self.detector is not None:
            self.detector.committed()

    def failed(self) -> None:
        if self.detector is not None:
            self.detector.failed()

    def reset(self, records: Sequence[OpRecord]) -> None:
        for record in records:
            record.status = "pending"
            record.version = None
