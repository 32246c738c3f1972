"""What each kind's commit means for the metrics, the log and the background parts.

Logged by ids only: never a note, a value, or any other text of a payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from gateway.metrics import EngineMetrics
from gateway.seam import WAKE_ESCALATION
from handlers.alerts import CRISIS, AckDecoded, AlertDecoded
from handlers.conflicts import ResolutionDecoded
from handlers.sync import Decoded
from storage.detection import JUDGED

log = structlog.get_logger("fieldgate.ingest")


class Observers:
    """One method per kind: (decoded payloads, its step's events) -> parts to wake."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics

    def sync(self, decoded: Sequence[Decoded], events: Sequence[Any]) -> list[str]:
        counts = {"stored": 0, "duplicate": 0}
        scored = hints = 0
        for payload in decoded:
            for record in payload.records:
                if record.status in counts:
                    counts[record.status] += 1
                if record.risk is not None:
                    scored += 1
                    hints += bool(record.reasons)
        for status, count in counts.items():
            self.metrics.ops.labels(status).inc(count)
        self.metrics.scored.inc(scored)
        self.metrics.hints.inc(hints)
        for event in events:
            if event["event"] == "detected":
                self.metrics.conflicts.labels(event["severity"]).inc()
            elif event["event"] == "joined":
                self.metrics.conflict_members.inc(event["count"])
            elif event["event"] == "merged":
                self.metrics.conflict_merges.inc(event["count"])
            elif event["event"] == JUDGED:
                self.metrics.conflicts_judged.inc(event["count"])
        return []

    def alerts(self, decoded: Sequence[AlertDecoded], _events: Sequence[Any]) -> list[str]:
        crisis = False
        for payload in decoded:
            record = payload.record
            if record is None:
                continue
            if record.status == "stored":
                self.metrics.alerts.labels(record.classification or "none").inc()
                crisis = crisis or record.classification == CRISIS
            log.info(
                "alert stored" if record.status == "stored" else "alert duplicate",
                alert_id=record.alert_id,
                device_id=record.device_id,
                classification=record.classification,
                notified=record.notified,
            )
        return [WAKE_ESCALATION] if crisis else []

    def crisis_acks(self, decoded: Sequence[AckDecoded], _events: Sequence[Any]) -> list[str]:
        acks = [payload.record for payload in decoded if payload.record is not None]
        for ack in acks:
            log.info("crisis ack", alert_id=ack.alert_id, outcome=ack.outcome)
        return [WAKE_ESCALATION] if acks else []

    def resolutions(
        self, decoded: Sequence[ResolutionDecoded], resolved: Sequence[Any]
    ) -> list[str]:
        for payload in decoded:
            record = payload.record
            if record is not None:
                log.info(
                    "conflict resolution", conflict_id=record.conflict_id, outcome=record.outcome
                )
        self.metrics.conflicts_resolved.inc(len(resolved))
        return []
