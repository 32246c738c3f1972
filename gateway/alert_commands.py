"""Admin commands of the alerts: `alerts/list`, `alerts/get`, `alerts/ack`.

An admin answer is published on the broker like any message: it never carries
an alert's `note` nor its raw payload.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import structlog
from msgspec import Meta
from sqlalchemy import Select, select

from gateway.admin import Command, CommandError, Progress
from gateway.pages import decode_cursor, encode_cursor
from gateway.services import Services
from handlers.errors import Code
from storage import alerts as alert_store
from storage.records import CrisisAckRecord
from storage.schema import alerts

log = structlog.get_logger("fieldgate.alerts")

Limit = Annotated[int, Meta(ge=1, le=1000)]
Str64 = Annotated[str, Meta(min_length=1, max_length=64)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SHOWN = [c for c in alerts.c if c.name not in ("note", "payload")]
"""Every column but the person's words and the raw payload that holds them."""


def _item(row: Any) -> dict[str, Any]:
    iso = alert_store.iso
    return {
        "alert_id": row["alert_id"],
        "device_id": row["device_id"],
        "user_id": row["user_id"],
        "kind": row["kind"],
        "occurred_at": iso(row["occurred_at"]),
        "received_at": iso(row["received_at"]),
        "stored_at": iso(row["stored_at"]),
        "mood": row["mood"],
        "stress": row["stress"],
        "energy": row["energy"],
        "flags": msgspec.json.decode(row["flags"]),
        "site_id": row["site_id"],
        "classification": row["classification"],
        "reasons": msgspec.json.decode(row["reasons"]),
        "notification_id": row["notification_id"],
        "escalation": row["escalation"],
        "next_escalation_at": iso(row["next_escalation_at"]),
        "acknowledged_at": iso(row["acknowledged_at"]),
        "acknowledged_by": row["acknowledged_by"],
    }


class AlertsListArgs(msgspec.Struct, forbid_unknown_fields=True):
    classification: Literal["crisis", "wellness", "none"] | None = None
    acknowledged: bool | None = None
    user_id: Str64 | None = None
    since: Annotated[datetime, Meta(tz=True)] | None = None
    limit: Limit = 100
    cursor: str | None = None


async def cmd_alerts_list(
    services: Services, args: AlertsListArgs, _progress: Progress
) -> dict[str, Any]:
    """Newest first. `acknowledged=true`: acknowledged crises; `false`: open crises."""
    try:
        below = decode_cursor(args.cursor)
    except ValueError as exc:
        raise CommandError(Code.INVALID_ARGS, str(exc), "cursor") from None
    query: Select[Any] = select(*SHOWN).order_by(alerts.c.id.desc()).limit(args.limit + 1)
    if below is not None:
        query = query.where(alerts.c.id < below)
    if args.classification is not None:
        query = query.where(alerts.c.classification == args.classification)
    if args.acknowledged is True:
        query = query.where(alerts.c.acknowledged_at.is_not(None))
    elif args.acknowledged is False:
        query = query.where(
            alerts.c.classification == alert_store.CRISIS, alerts.c.acknowledged_at.is_(None)
        )
    if args.user_id is not None:
        query = query.where(alerts.c.user_id == args.user_id)
    if args.since is not None:
        query = query.where(
            alerts.c.received_at >= (args.since - _EPOCH) // timedelta(microseconds=1)
        )
    async with services.engine.connect() as conn:
        rows = list((await conn.execute(query)).mappings())
    page = rows[: args.limit]
    more = len(rows) > args.limit
    return {
        "items": [_item(row) for row in page],
        "next_cursor": encode_cursor(page[-1]["id"]) if more else None,
    }


class AlertsGetArgs(msgspec.Struct, forbid_unknown_fields=True):
    alert_id: Str64


async def cmd_alerts_get(
    services: Services, args: AlertsGetArgs, _progress: Progress
) -> dict[str, Any]:
    async with services.engine.connect() as conn:
        row = (
            (await conn.execute(select(*SHOWN).where(alerts.c.alert_id == args.alert_id)))
            .mappings()
            .first()
        )
    if row is None:
        raise CommandError(Code.INVALID_ARGS, "no alert with that alert_id", "alert_id")
    return _item(row)


class AlertsAckArgs(msgspec.Struct, forbid_unknown_fields=True):
    alert_id: Str64
    by: Annotated[str, Meta(min_length=1, max_length=128)]


async def cmd_alerts_ack(
    services: Services, args: AlertsAckArgs, _progress: Progress
) -> dict[str, Any]:
    """The same as `{"alert_id", "by"}` on `<root>/alerts/crisis/ack`, answered."""
    now_us = time.time_ns() // 1000
    ack = CrisisAckRecord(alert_id=args.alert_id, by=args.by, received_at_us=now_us)
    async with services.engine.begin() as conn:
        await alert_store.acknowledge(conn, [ack], now_us)
    log.info("crisis ack", alert_id=ack.alert_id, outcome=ack.outcome, source="admin")
    if ack.outcome == "unknown":
        raise CommandError(Code.INVALID_ARGS, "no crisis alert with that alert_id", "alert_id")
    services.escalator.poke()
    return {
        "alert_id": ack.alert_id,
        "status": ack.outcome,
        "acknowledged_at": alert_store.iso(ack.acknowledged_at_us),
        "acknowledged_by": ack.acknowledged_by,
    }


ALERT_COMMANDS: dict[str, Command] = {
    "alerts/list": Command(cmd_alerts_list, AlertsListArgs),
    "alerts/get": Command(cmd_alerts_get, AlertsGetArgs),
    "alerts/ack": Command(cmd_alerts_ack, AlertsAckArgs),
}
