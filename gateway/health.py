"""Health and stats: what `health`/`stats` answer and `<root>/health` carries."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import text

from gateway.services import Services
from storage import outbox

CHECK_TIMEOUT_S = 2.0


def writer_stuck_s(services: Services) -> float:
    """How long the writer has made no progress: the running transaction attempt's
    age, or, when idle, the time since its loop last woke."""
    since = services.writer.attempt_started or services.ingest.last_beat
    return time.monotonic() - since


def writer_alive(services: Services) -> bool:
    """A database outage is not a wedge (each retry is a new attempt); a statement
    that never returns is, and then systemd's watchdog restarts the daemon."""
    return writer_stuck_s(services) < services.settings.health.wedged_after_s


async def _database(services: Services) -> dict[str, Any]:
    if not writer_alive(services):
        return {"ok": False, "detail": f"writer stuck for {writer_stuck_s(services):.0f} s"}
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure is "not ok", with its kind
        return {"ok": False, "detail": type(exc).__name__}
    if not services.writer.healthy:
        return {"ok": False, "detail": f"commits failing: {services.writer.last_error}"}
    return {"ok": True}


async def _redis(services: Services) -> dict[str, Any]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await services.redis.ping()
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "detail": type(exc).__name__}
    return {"ok": True}


def _mqtt(services: Services) -> dict[str, Any]:
    session = services.session
    if session.connected.is_set():
        return {"ok": True, "reconnects": session.reconnects}
    return {"ok": False, "detail": session.last_error or "connecting"}


async def health(services: Services) -> dict[str, Any]:
    """Healthy means it can take and store operations: broker and database up.

    Redis only serves the webhook dead-letter queue, which waits in the database
    while Redis is down, so it is reported but does not make the gateway unhealthy.
    """
    database, redis = await asyncio.gather(_database(services), _redis(services))
    checks = {
        "mqtt": _mqtt(services),
        "database": database,
        "redis": redis,
        "model": {"ok": True, "detail": "no model active"},
    }
    return {"healthy": bool(checks["mqtt"]["ok"] and database["ok"]), "checks": checks}


def _value(services: Services, name: str, labels: dict[str, str] | None = None) -> int:
    value = services.metrics.registry.get_sample_value(name, labels or {})
    return int(value or 0)


def _by_label(services: Services, name: str, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for family in services.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and label in sample.labels:
                out[sample.labels[label]] = int(sample.value)
    return out


async def _outbox_depth(services: Services) -> int | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S), services.engine.connect() as conn:
            return await outbox.depth(conn, "mqtt")
    except Exception:  # noqa: BLE001 - depth is best effort; health says why
        return None


async def stats(services: Services) -> dict[str, Any]:
    """Counters since this process started, and the depth of every queue."""
    ops = _by_label(services, "fieldgate_sync_ops_total", "status")
    return {
        "since": services.started_at.isoformat().replace("+00:00", "Z"),
        "uptime_s": round(time.time() - services.started_at.timestamp(), 1),
        "ops": {
            "stored": ops.get("stored", 0),
            "duplicate": ops.get("duplicate", 0),
            "rejected": sum(_by_label(services, "fieldgate_rejected_total", "code").values()),
        },
        "rejected_by_code": _by_label(services, "fieldgate_rejected_total", "code"),
        "conflicts": _by_label(services, "fieldgate_conflicts_detected_total", "severity"),
        "messages": _by_label(services, "fieldgate_messages_received_total", "kind"),
        "alerts": _by_label(services, "fieldgate_alerts_total", "classification"),
        "open_crises": _value(services, "fieldgate_open_crises"),
        "escalations": _value(services, "fieldgate_crisis_escalations_total"),
        "commits": services.writer.commits,
        "queues": {
            "in_flight": len(services.ingest.acks),
            "pending_commit": services.ingest.pending,
            "outbox": await _outbox_depth(services),
            "mqtt_outgoing": services.session.outgoing_pending(),
        },
        "outbox": {"published": services.outbox.published, "failed": services.outbox.failed},
    }
