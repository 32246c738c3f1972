"""The quarantine: every rejected payload, raw, with its topic, time and error."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from storage.records import QuarantineRecord
from storage.schema import quarantine


async def store(conn: AsyncConnection, records: Sequence[QuarantineRecord]) -> None:
    if not records:
        return
    await conn.execute(
        quarantine.insert(),
        [
            {
                "received_at": r.received_at_us,
                "topic": r.topic,
                "device_id": r.device_id,
                "kind": r.kind,
                "code": r.code,
                "message": r.message,
                "path": r.path,
                "payload": r.payload,
                "payload_bytes": r.payload_bytes,
            }
            for r in records
        ],
    )
