"""The sync operations' share of the writer's transaction: store, score, detect.

Scoring and conflict detection run after `store_ops` in the same transaction, while
the version upsert holds every touched entity's row lock (storage/conflicts.py).
Scoring reads the feature counters before detection bumps them: an operation is
scored from what was committed before its commit (ml/dataset.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.records import OpRecord
from handlers.times import now_us
from storage import sync_log
from storage.conflicts import Detector
from storage.writer import CANARY, Step, Written


class Scoring(Protocol):
    """What scores stored operations (ml/scoring.py): storage knows it by this shape."""

    async def score(self, conn: AsyncConnection, stored: Sequence[OpRecord]) -> None:
        """Set `risk` (and, for a hint, `reasons`) of `stored` when a model is active."""


class SyncStep(Step):
    """Stores operations exactly once with their versions; the detector (when given)
    finds their conflicts and keeps the per-user and per-device counters. Its events
    are the detector's (`storage.conflicts.Detected`)."""

    record_type = OpRecord
    name = "ops"

    def __init__(self, detector: Detector | None = None, scoring: Scoring | None = None) -> None:
        self.detector = detector
        self.scoring = scoring

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        prior = await sync_log.store_ops(conn, records, now_us)
        if self.scoring is not None:
            await self.scoring.score(conn, [r for r in records if r.status == "stored"])
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

    def canary(self) -> OpRecord:
        """An operation of plain ASCII values on an entity no device has."""
        marker = f"fieldgate-canary-{uuid.uuid4().hex}"
        now = now_us()
        return OpRecord(
            op_id=marker,
            device_id=CANARY,
            user_id=CANARY,
            entity_type=CANARY,
            entity_id=marker,
            operation="create",
            changes={},
            changes_json="{}",
            edited_at_us=now,
            received_at_us=now,
        )

    def reset(self, records: Sequence[OpRecord]) -> None:
        for record in records:
            record.status = "pending"
            record.version = None
            record.risk = None
            record.reasons = ()
