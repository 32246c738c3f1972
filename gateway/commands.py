"""The admin command table and the commands of the gateway itself.

A feature adds its commands by adding rows here (or a module of rows merged
into `TABLE`); `gateway.admin` does the protocol around them.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from sqlalchemy import select

from gateway import __version__, config, health, logs
from gateway.admin import Command, CommandError, Progress
from gateway.alert_commands import ALERT_COMMANDS
from gateway.conflict_commands import TABLE as CONFLICT_COMMANDS
from gateway.pages import decode_cursor, encode_cursor
from gateway.services import Services
from handlers.errors import Code
from storage import sync_log
from storage.schema import quarantine

Limit = Annotated[int, Meta(ge=1, le=1000)]


def iso(us: int | None) -> str | None:
    """Microseconds since the epoch as RFC 3339 UTC with a `Z`."""
    if us is None:
        return None
    moment = datetime.fromtimestamp(us / 1_000_000, tz=UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cursor(cursor: str | None) -> int | None:
    try:
        return decode_cursor(cursor)
    except ValueError as exc:
        raise CommandError(Code.INVALID_ARGS, str(exc), "cursor") from None


async def cmd_health(services: Services, _args: Any, _progress: Progress) -> dict[str, Any]:
    return await health.health(services)


async def cmd_info(services: Services, _args: Any, _progress: Progress) -> dict[str, Any]:
    settings = services.settings
    return {
        "version": __version__,
        "instance": settings.instance,
        "started_at": services.started_at.isoformat().replace("+00:00", "Z"),
        "config_path": str(services.config_path or config.DEFAULT_CONFIG_PATH),
        "topic_root": settings.mqtt.topic_root,
        "database": config.hide_url_password(settings.database.url),
        "shared_group": settings.mqtt.shared_group,
    }


async def cmd_stats(services: Services, _args: Any, _progress: Progress) -> dict[str, Any]:
    return await health.stats(services)


async def cmd_config_get(services: Services, _args: Any, _progress: Progress) -> dict[str, Any]:
    return config.redacted(services.settings)


async def cmd_config_reload(services: Services, _args: Any, _progress: Progress) -> dict[str, Any]:
    try:
        needs_restart = services.reload()
    except config.ConfigError as exc:
        raise CommandError(Code.INVALID_ARGS, str(exc)) from None
    return {"reloaded": True, "needs_restart": needs_restart}


class LogLevelArgs(msgspec.Struct, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"]


async def cmd_log_level(
    services: Services, args: LogLevelArgs, _progress: Progress
) -> dict[str, Any]:
    logs.set_level(args.level)
    return {"level": args.level}


class QuarantineListArgs(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit = 100
    cursor: str | None = None


def _shown_payload(kind: str, raw: bytes) -> str | None:
    """A rejected alert may hold a person's note: its bytes are never shown."""
    if kind == "alert":
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


async def cmd_quarantine_list(
    services: Services, args: QuarantineListArgs, _progress: Progress
) -> dict[str, Any]:
    below = _cursor(args.cursor)
    query = select(quarantine).order_by(quarantine.c.id.desc()).limit(args.limit + 1)
    if below is not None:
        query = query.where(quarantine.c.id < below)
    async with services.engine.connect() as conn:
        rows = list((await conn.execute(query)).mappings())
    page = rows[: args.limit]
    items = [
        {
            "id": row["id"],
            "received_at": iso(row["received_at"]),
            "topic": row["topic"],
            "device_id": row["device_id"],
            "kind": row["kind"],
            "error": {"code": row["code"], "message": row["message"], "path": row["path"]},
            "payload": _shown_payload(row["kind"], row["payload"]),
            "payload_bytes": row["payload_bytes"],
        }
        for row in page
    ]
    more = len(rows) > args.limit
    return {"items": items, "next_cursor": encode_cursor(page[-1]["id"]) if more else None}


class SyncHistoryArgs(msgspec.Struct, forbid_unknown_fields=True):
    entity_type: Annotated[str, Meta(min_length=1, max_length=64)]
    entity_id: Annotated[str, Meta(min_length=1, max_length=128)]
    limit: Limit = 100


async def cmd_sync_history(
    services: Services, args: SyncHistoryArgs, _progress: Progress
) -> dict[str, Any]:
    async with services.engine.connect() as conn:
        rows = await sync_log.history(conn, args.entity_type, args.entity_id, args.limit)
    items = [
        {
            "op_id": row["op_id"],
            "version": row["version"],
            "device_id": row["device_id"],
            "user_id": row["user_id"],
            "operation": row["operation"],
            "changes": msgspec.json.decode(row["changes"]),
            "edited_at": iso(row["edited_at"]),
            "received_at": iso(row["received_at"]),
            "base_version": row["base_version"],
            "batch_id": row["batch_id"],
        }
        for row in rows
    ]
    return {"entity_type": args.entity_type, "entity_id": args.entity_id, "items": items}


TABLE: dict[str, Command] = {
    "health": Command(cmd_health),
    "info": Command(cmd_info),
    "stats": Command(cmd_stats),
    "config/get": Command(cmd_config_get),
    "config/reload": Command(cmd_config_reload),
    "log_level": Command(cmd_log_level, LogLevelArgs),
    "quarantine/list": Command(cmd_quarantine_list, QuarantineListArgs),
    "sync/history": Command(cmd_sync_history, SyncHistoryArgs),
    **ALERT_COMMANDS,
    **CONFLICT_COMMANDS,
}
