"""`quarantine/list`: what was rejected, and why, newest first."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import Limit, below, page
from gateway.admin.server import Command
from handlers.admin import Progress
from handlers.times import rfc3339
from storage import quarantine


class ListArgs(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: str | None = None


def shown_payload(kind: str, raw: bytes) -> str | None:
    """A rejected alert may hold a person's note: its bytes are never shown."""
    if kind == "alert":
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


def _item(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "received_at": rfc3339(row["received_at"]),
        "topic": row["topic"],
        "device_id": row["device_id"],
        "kind": row["kind"],
        "error": {"code": row["code"], "message": row["message"], "path": row["path"]},
        "payload": shown_payload(row["kind"], row["payload"]),
        "payload_bytes": row["payload_bytes"],
    }


class QuarantineCommands:
    def __init__(self, database: AsyncEngine) -> None:
        self.database = database

    def commands(self) -> list[Command]:
        return [Command("quarantine/list", self.list, ListArgs)]

    async def list(self, args: ListArgs, _progress: Progress) -> dict[str, Any]:
        async with self.database.connect() as conn:
            rows = await quarantine.page(conn, below(args.cursor), args.limit + 1)
        return page(rows, args.limit, _item)
