"""What handlers hand to the writer: plain records, one per row to be written.

Both sides depend on this module and on nothing of each other's: handlers make
records, storage stores them. The writer fills in what only the transaction
knows (an op's `status` and `version`, an alert's final classification).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

OpStatus = Literal["pending", "stored", "duplicate"]


class OpRecord(msgspec.Struct, kw_only=True):
    op_id: str
    device_id: str
    user_id: str
    entity_type: str
    entity_id: str
    operation: Literal["create", "update", "delete"]
    changes: dict[str, Any]
    changes_json: str
    edited_at_us: int
    received_at_us: int
    base_version: int | None = None
    session_id: str | None = None
    device_meta: str | None = None
    batch_id: str | None = None
    status: OpStatus = "pending"
    version: int | None = None
    risk: float | None = None
    """The active conflict model's probability that it ends in a conflict (stored ops)."""
    reasons: tuple[str, ...] = ()
    """At or above the hint threshold: the features that pushed `risk` most."""


class QuarantineRecord(msgspec.Struct, kw_only=True, frozen=True):
    """A rejected payload, raw, so an operator can see exactly what a device sent."""

    received_at_us: int
    topic: str
    device_id: str | None
    kind: str
    code: str
    message: str
    path: str | None
    payload: bytes
    payload_bytes: int


class OutboxRecord(msgspec.Struct, kw_only=True, frozen=True):
    """Something to publish (channel `mqtt`) or deliver as an event (channel `webhook`),
    written in the same transaction as its cause and sent after the commit."""

    channel: Literal["mqtt", "webhook"]
    payload: bytes
    topic: str | None = None
    also_to: tuple[str, ...] = ()
    """The same payload to these topics too: one row, fanned out when published (a
    conflict's message to the operators and to every device concerned)."""
    event_type: str | None = None
    qos: int = 1
    retain: bool = False
    origin_at_us: int | None = None
    """When the cause reached the gateway (receipt-to-publication metrics), if known."""
    urgent: bool = False
    """Leased to the committing process, which publishes it right after the commit
    instead of waiting for the publisher's next claim (crisis alerts)."""


AlertStatus = Literal["pending", "stored", "duplicate"]


class AlertRecord(msgspec.Struct, kw_only=True):
    """One accepted alert. The handler fills what the payload alone decides; the writer,
    inside the transaction, what needs the database: the history rule, the cooldown,
    duplicates. `note` and `payload` are stored and go nowhere else."""

    alert_id: str
    device_id: str
    user_id: str
    kind: Literal["journal", "panic", "checkin"]
    occurred_at_us: int
    received_at_us: int
    mood: int | None = None
    stress: int | None = None
    energy: int | None = None
    flags: list[str] = msgspec.field(default_factory=list)
    site_id: str | None = None
    note: str | None = None
    payload: bytes = b""
    base_classification: str = "none"
    base_reasons: list[str] = msgspec.field(default_factory=list)
    low_mood_journal: bool = False
    """A journal entry with a low mood: counts toward `sustained_low_mood`."""
    # Set by the writer:
    status: AlertStatus = "pending"
    classification: str | None = None
    reasons: list[str] = msgspec.field(default_factory=list)
    notified: str | None = None
    """The reason of the wellness notification this alert caused, if one was sent."""


AckOutcome = Literal["pending", "acknowledged", "already_acknowledged", "unknown"]


class CrisisAckRecord(msgspec.Struct, kw_only=True):
    """An operator's acknowledgement of a crisis alert (topic or admin command)."""

    alert_id: str
    by: str
    received_at_us: int
    outcome: AckOutcome = "pending"
    acknowledged_at_us: int | None = None
    acknowledged_by: str | None = None


ResolutionOutcome = Literal["pending", "resolved", "refused"]


class ResolutionRecord(msgspec.Struct, kw_only=True):
    """An operator's resolution of a conflict (the admin command `conflicts/resolve`):
    one member that wins every field it changes, per-field winners, or both."""

    conflict_id: str
    by: str
    winner_op_id: str | None = None
    winners: dict[str, str] = msgspec.field(default_factory=dict)
    # Set by the writer:
    outcome: ResolutionOutcome = "pending"
    problem: str | None = None
    """Why it was refused, for the operator."""
    problem_path: str | None = None
    """The argument at fault: `conflict_id`, `winner_op_id`, `winners.<field>`..."""
    conflict: dict[str, Any] | None = None
    """The conflict as the transaction left it."""
