"""The table of message kinds: one row per kind of message the engine takes.

A row names the topic the gateway subscribes to (none for a write that only an
admin command submits), the decoder (handlers/), what it writes (a storage
`Step`), how it is answered, and whether it is urgent (committed at once, ahead
of what waits for a group commit). The intake routes by the patterns, the
engine decodes, commits and answers by the rows, and the writer runs the steps
in the rows' order: adding a kind is a row here, its handler module and its
step (docs/architecture.md, "How to add a message kind").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.ingest import answers
from gateway.ingest.observe import Observers
from gateway.seam import KIND_PATTERNS, Delivery, Outbound, Reply
from handlers.alerts import AlertHandler
from handlers.conflicts import decode_resolution
from handlers.errors import Error
from handlers.records import QuarantineRecord
from handlers.sync import SyncHandler
from storage.alerts import AlertStep, CrisisAckStep
from storage.conflict_store import ResolutionStep
from storage.detection import DetectionStep
from storage.sync import SyncStep
from storage.writer import Step


class Decoded(Protocol):
    """What every handler makes of a payload."""

    quarantine: list[QuarantineRecord]

    @property
    def records(self) -> Sequence[Any]:
        """What to store (the writer's steps take them by type)."""

    def rejections(self) -> list[tuple[str | None, Error]]:
        """Each refused item's id (if it had a usable one) and error."""

    def refuse(self, record: object, error_name: str) -> tuple[str | None, Error]:
        """The database refused `record` alone: make it a rejection; its id and error."""


Answer = Callable[[str, Sequence[tuple[Delivery, Any]]], list[Outbound]]
Observe = Callable[[Sequence[Any], Sequence[Any]], list[str]]
"""(the batch's decoded payloads of the kind, its step's events) -> parts to wake."""


@dataclass(frozen=True)
class Kind:
    name: str
    pattern: str | None
    """Under the topic root; `{device_id}` takes one level. None: admin writes only.
    The seam's KIND_PATTERNS, by which the MQTT side routes, hold the same."""
    decode: Callable[[Delivery], Decoded]
    step: Step
    answer: Answer | None = None
    """The messages that answer the kind's payloads after the commit."""
    reply: Callable[[Any], Reply] | None = None
    """The reply to an admin command's write of this kind."""
    observe: Observe | None = None
    urgent: bool = False


@dataclass
class Steps:
    """The writer's steps, kept so that a config reload can change their rules."""

    def in_lock_order(self) -> list[Step]:
        """The order the transaction runs them in, the same on every instance and every
        version: sync (entities, then counters), alerts, crisis acks, resolutions,
        detection after the ack (a transaction of its own: entities, conflicts, then
        counters). Two instances that took the same locks in other orders could
        deadlock."""
        return [self.sync, self.alerts, self.crisis_acks, self.resolutions, self.detection]

    alerts: AlertStep
    crisis_acks: CrisisAckStep
    sync: SyncStep
    resolutions: ResolutionStep
    detection: DetectionStep


def table(
    sync: SyncHandler, alerts: AlertHandler, steps: Steps, observers: Observers
) -> list[Kind]:
    """The rows, urgent first (observers and answers run in this order)."""

    def device(delivery: Delivery) -> str:
        return delivery.params.get("device_id", "")

    return [
        Kind(
            "alert",
            KIND_PATTERNS["alert"],
            lambda d: alerts.decode(d.topic, device(d), d.payload, d.received_at_us),
            steps.alerts,
            answer=answers.alert_answers,
            observe=observers.alerts,
            urgent=True,
        ),
        Kind(
            "crisis_ack",
            KIND_PATTERNS["crisis_ack"],
            lambda d: alerts.decode_ack(d.topic, d.payload, d.received_at_us),
            steps.crisis_acks,
            reply=answers.crisis_ack_reply,
            observe=observers.crisis_acks,
            urgent=True,
        ),
        Kind(
            "sync",
            KIND_PATTERNS["sync"],
            lambda d: sync.decode(d.topic, device(d), d.payload, d.received_at_us),
            steps.sync,
            answer=answers.sync_answers,
            observe=observers.sync,
        ),
        Kind(
            "conflict_resolution",
            KIND_PATTERNS["conflict_resolution"],
            lambda d: decode_resolution(d.payload),
            steps.resolutions,
            reply=answers.resolution_reply,
            observe=observers.resolutions,
        ),
    ]
