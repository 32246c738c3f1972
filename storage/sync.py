"""The sync operations' share of the writer's transaction: store, score, count, and
detect when detection runs in the commit.

Scoring runs after `store_ops` in the same transaction, while the version upsert
holds every touched entity's row lock, and reads the feature counters before the
batch bumps them: an operation is scored from what was committed before its commit
(ml/dataset.py). Conflict detection runs here only with `conflicts.detect =
"in_commit"`; by default it judges the operations after the ack (storage/detection.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from handlers.records import OpRecord
from handlers.times import now_us
from storage import detection, feature_counters, sync_log
from storage.conflicts import Detector, bump_counters, skip
from storage.writer import CANARY, Step, Written


class Scoring(Protocol):
    """What scores stored operations (ml/scoring.py): storage knows it by this shape."""

    async def score(self, conn: AsyncConnection, stored: Sequence[OpRecord]) -> None:
        """Set `risk` (and, for a hint, `reasons`) of `stored` when a model is active."""


class SyncStep(Step):
    """Stores operations exactly once with their versions, and counts them (per user,
    device, entity and field: what scoring reads). With a detector that judges in the
    commit, finds their conflicts too; its events are then the detector's
    (`storage.conflicts.Detected`)."""

    record_type = OpRecord
    name = "ops"

    def __init__(self, detector: Detector | None = None, scoring: Scoring | None = None) -> None:
        self.detector = detector
        self.scoring = scoring

    async def write(self, conn: AsyncConnection, records: list[Any], now_us: int) -> Written:
        prior = await sync_log.store_ops(conn, records, now_us)
        stored = [record for record in records if record.status == "stored"]
        if self.scoring is not None:
            await self.scoring.score(conn, stored)
        await bump_counters(conn, stored, {}, now_us)
        await feature_counters.bump(conn, stored, ())
        detector = self.detector
        if detector is None or not stored:
            return Written()
        if not detector.enabled:
            await skip(conn, list(prior))
            return Written()
        if not detector.in_commit:
            return Written()
        detected = await detection.in_commit(conn, detector, stored, now_us, prior)
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
