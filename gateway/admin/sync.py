"""`sync/history`: an entity's operations, newest first, with their versions."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import Limit
from gateway.admin.server import Command
from handlers.admin import Progress
from handlers.fields import Str64, Str128
from handlers.times import rfc3339
from storage import sync_log


class HistoryArgs(msgspec.Struct, forbid_unknown_fields=True):
    entity_type: Str64
    entity_id: Str128
    limit: Limit = 100


class SyncCommands:
    def __init__(self, database: AsyncEngine) -> None:
        self.database = database

    def commands(self) -> list[Command]:
        return [Command("sync/history", self.history, HistoryArgs)]

    async def history(self, args: HistoryArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            rows = await sync_log.history(conn, args.entity_type, args.entity_id, args.limit)
        items = [
            {
                "op_id": row["op_id"],
                "version": row["version"],
                "device_id": row["device_id"],
                "user_id": row["user_id"],
                "operation": row["operation"],
                "changes": msgspec.json.decode(row["changes"]),
                "edited_at": rfc3339(row["edited_at"]),
                "received_at": rfc3339(row["received_at"]),
                "base_version": row["base_version"],
                "batch_id": row["batch_id"],
            }
            for row in rows
        ]
        return {"entity_type": args.entity_type, "entity_id": args.entity_id, "items": items}
