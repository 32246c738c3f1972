"""What handlers hand to the writer: plain records, one per row to be written.

The writer fills `status` and `version` of each `OpRecord` once the transaction
that stored it has committed; nothing else is mutated after a handler made it.
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
    event_type: str | None = None
    qos: int = 1
    retain: bool = False
