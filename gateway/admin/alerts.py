"""`alerts/list`, `alerts/get`, `alerts/ack`.

An admin answer is published on the broker like any message: it never carries
an alert's `note` nor its raw payload (storage.alerts.SHOWN leaves both out).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import Limit, Writes, answer_of, below, invalid, page, us
from gateway.admin.server import Command
from handlers.admin import Progress
from handlers.fields import AwareTime, Str64, Str128
from handlers.times import rfc3339
from storage import alerts

_encode = msgspec.json.Encoder().encode


def _item(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "alert_id": row["alert_id"],
        "device_id": row["device_id"],
        "user_id": row["user_id"],
        "kind": row["kind"],
        "occurred_at": rfc3339(row["occurred_at"], None),
        "received_at": rfc3339(row["received_at"], None),
        "stored_at": rfc3339(row["stored_at"], None),
        "mood": row["mood"],
        "stress": row["stress"],
        "energy": row["energy"],
        "flags": msgspec.json.decode(row["flags"]),
        "site_id": row["site_id"],
        "classification": row["classification"],
        "reasons": msgspec.json.decode(row["reasons"]),
        "notification_id": row["notification_id"],
        "escalation": row["escalation"],
        "next_escalation_at": rfc3339(row["next_escalation_at"], None),
        "acknowledged_at": rfc3339(row["acknowledged_at"], None),
        "acknowledged_by": row["acknowledged_by"],
    }


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    classification: Literal["crisis", "wellness", "none"] | None = None
    acknowledged: bool | None = None
    user_id: Str64 | None = None
    since: AwareTime | None = None
    limit: Limit = 100
    cursor: str | None = None


class GetArgs(msgspec.Struct, forbid_unknown_fields=True):
    alert_id: Str64


class AckArgs(msgspec.Struct, forbid_unknown_fields=True):
    alert_id: Str64
    by: Str128


class AlertCommands:
    """Reads from the database; an acknowledgement goes through the engine, as a crisis
    ack from the topic would."""

    def __init__(self, database: AsyncEngine, writes: Writes) -> None:
        self.database = database
        self.writes = writes

    def commands(self) -> list[Command]:
        return [
            Command("alerts/list", self.list, ListArgs),
            Command("alerts/get", self.get, GetArgs),
            Command("alerts/ack", self.ack, AckArgs, writes=True),
        ]

    async def list(self, args: ListArgs, _progress: Progress) -> dict[str, Any]:
        """Newest first. `acknowledged=true`: acknowledged crises; `false`: open crises."""
        async with self.database.connect() as conn:
            rows = await alerts.page(
                conn,
                classification=args.classification,
                acknowledged=args.acknowledged,
                user_id=args.user_id,
                since_us=us(args.since),
                below_id=below(args.cursor),
                limit=args.limit + 1,
            )
        return page(rows, args.limit, _item)

    async def get(self, args: GetArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            row = await alerts.get(conn, args.alert_id)
        if row is None:
            raise invalid("no alert with that alert_id", "alert_id")
        return _item(row)

    async def ack(self, args: AckArgs, _progress: Progress) -> dict[str, Any]:
        """The same as `{"alert_id", "by"}` on `<root>/alerts/crisis/ack`, answered."""
        body = _encode({"alert_id": args.alert_id, "by": args.by})
        return answer_of(await self.writes("crisis_ack", body))
