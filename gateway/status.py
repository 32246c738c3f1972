"""Health and stats: what `health`/`stats` answer and `<root>/health` carries.

Read from the parts themselves, at the moment of asking: the MQTT session, the
engine process (its state and metrics as it last reported them, asked again
for stats), the database, Redis, the metrics registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.samples import Sample
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import __version__
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.mqtt.engine_process import EngineProcess
from gateway.mqtt.intake import Intake
from gateway.mqtt.session import MqttSession
from handlers.times import rfc3339, to_us
from storage import conflict_store, outbox

CHECK_TIMEOUT_S = 2.0


class Published(Protocol):
    """A publisher's counts since start (the outbox publisher)."""

    published: int
    failed: int


class Delivering(Protocol):
    """The webhook sender's counts since start."""

    delivered: int
    failed: int
    dead: int


class Status:
    """What the daemon can say about itself; shared by the admin commands, the retained
    health report and the systemd watchdog."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        started_at: datetime,
        *,
        sessions: Sequence[MqttSession],
        intake: Intake,
        engine: EngineProcess,
        database: AsyncEngine,
        redis: Redis,
        metrics: Metrics,
        outbox: Published,
        webhooks: Delivering,
        trouble: Callable[[], dict[str, dict[str, object]]],
    ) -> None:
        self.settings = settings
        self.started_at = started_at
        self.sessions = list(sessions)
        self.intake = intake
        self.engine = engine
        self.database = database
        self.redis = redis
        self.metrics = metrics
        self.outbox = outbox
        self.webhooks = webhooks
        self.trouble = trouble
        """Parts that failed recently and were restarted (`Parts.trouble`)."""

    def engine_trouble(self) -> str | None:
        """Why the engine cannot store now: it is down, or its writer is wedged; None when
        it can. A database outage is not a wedge (each retry is a new attempt); a
        statement that never returns is, and then systemd's watchdog restarts the daemon."""
        engine = self.engine
        if engine.down is not None:
            return engine.down
        if not engine.alive(self.settings().health.wedged_after_s):
            return f"writer stuck for {engine.stuck_s():.0f} s"
        return None

    def unhealthy(self) -> str | None:
        """What is wrong, from what is known without asking anyone (systemd's status
        line asks every second): the engine down or wedged, or its commits failing."""
        trouble = self.engine_trouble()
        if trouble is not None:
            return f"engine: {trouble}"
        if not self.engine.state.healthy:
            return f"database: commits failing: {self.engine.state.last_error}"
        return None

    def _engine(self) -> dict[str, Any]:
        trouble = self.engine_trouble()
        return {"ok": True} if trouble is None else {"ok": False, "detail": trouble}

    async def _database(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), self.database.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure is "not ok", with its kind
            return {"ok": False, "detail": type(exc).__name__}
        if not self.engine.state.healthy:
            return {"ok": False, "detail": f"commits failing: {self.engine.state.last_error}"}
        return {"ok": True}

    async def _redis(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "detail": type(exc).__name__}
        return {"ok": True}

    def _mqtt(self) -> dict[str, Any]:
        """Both lanes' sessions as one check: not ok while one is down (its lane's
        messages wait at the broker) or has a subscription refused (its messages never
        come), and then each lane's own check under `lanes`, its client id among them;
        reconnects add up; a lost session, named by lane, and the shortest expiry granted
        are facts an operator must see."""
        lanes = {session.lane: _session_check(session) for session in self.sessions}
        down = [f"{lane}: {check['detail']}" for lane, check in lanes.items() if not check["ok"]]
        check: dict[str, Any] = {"ok": not down}
        if down:
            check["detail"] = "; ".join(down)
        up = [session for session in self.sessions if session.connected.is_set()]
        if up:
            check["reconnects"] = sum(session.reconnects for session in self.sessions)
            granted = [s.expiry_granted_s for s in up if s.expiry_granted_s is not None]
            check["session_expiry_granted_s"] = min(granted) if granted else None
        refused = [r for c in lanes.values() for r in c.get("subscription_refused", [])]
        if refused:
            check["subscription_refused"] = refused
        lost = [session for session in self.sessions if session.session_lost_at is not None]
        if lost:
            last = max(lost, key=lambda session: session.session_lost_at or 0)
            check["session_lost"] = {"at": rfc3339(last.session_lost_at or 0), "lane": last.lane}
        if down:
            check["lanes"] = lanes
        return check

    def _model(self) -> dict[str, Any]:
        """The conflict model the engine scores with, as it last said. A refused file
        is not ok (operations go unscored) but does not make the gateway unhealthy:
        every operation is still stored and answered."""
        state = self.engine.state
        if state.model_refused is not None:
            return {"ok": False, "detail": f"the active model is refused: {state.model_refused}"}
        if state.model_id is None:
            return {"ok": True, "detail": "no model active"}
        return {"ok": True, "detail": f"scoring with {state.model_id}", "model_id": state.model_id}

    async def health(self) -> dict[str, Any]:
        """Healthy means it can take and store operations (broker, engine process and
        database up, the engine's writer not wedged) and every part runs (none failed in
        the last minutes: a part that fails is restarted, and while it fails, its work,
        crisis escalations or the outbox, is not done).

        Redis only serves the webhook dead-letter queue, which waits in the database
        while Redis is down, so it is reported but does not make the gateway unhealthy.
        """
        database, redis = await asyncio.gather(self._database(), self._redis())
        failing = self.trouble()
        parts: dict[str, Any] = {"ok": not failing}
        if failing:
            parts["failing"] = failing
        engine = self._engine()
        checks = {
            "mqtt": self._mqtt(),
            "engine": engine,
            "database": database,
            "redis": redis,
            "model": self._model(),
            "parts": parts,
        }
        healthy = checks["mqtt"]["ok"] and engine["ok"] and database["ok"] and parts["ok"]
        return {"healthy": bool(healthy), "checks": checks}

    def _samples(self) -> list[Sample]:
        """Every series' samples, collected once: the engine's are parsed from its last
        report at each collection."""
        return [sample for family in self.metrics.registry.collect() for sample in family.samples]

    async def _from_database(
        self,
    ) -> tuple[int | None, dict[str, int] | None, int | None, int | None]:
        """The outbox's depth, the conflicts and their members now, and the operations
        detection has yet to judge (every instance's): best effort, since `health` says
        why the database does not answer."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S), self.database.connect() as conn:
                depth = await outbox.depth(conn, "mqtt")
                per_severity, members = await conflict_store.totals(conn)
                waiting = await conflict_store.waiting(conn)
        except Exception:  # noqa: BLE001
            return None, None, None, None
        return depth, per_severity, members, waiting

    async def stats(self) -> dict[str, Any]:
        """Counters since this process started, the conflicts as they stand (all
        instances), and the depth of every queue."""
        await self.engine.refresh()
        samples = self._samples()
        ops = _by_label(samples, "fieldgate_sync_ops_total", "status")
        rejected = _by_label(samples, "fieldgate_rejected_total", "code")
        depth, conflicts, members, waiting = await self._from_database()
        return {
            "since": started_at_text(self.started_at),
            "uptime_s": round(time.time() - self.started_at.timestamp(), 1),
            "ops": {
                "stored": ops.get("stored", 0),
                "duplicate": ops.get("duplicate", 0),
                "rejected": sum(rejected.values()),
            },
            "rejected_by_code": rejected,
            "conflicts": conflicts,
            "conflict_members": members,
            "messages": _by_label(samples, "fieldgate_messages_received_total", "kind"),
            "alerts": _by_label(samples, "fieldgate_alerts_total", "classification"),
            "open_crises": _value(samples, "fieldgate_open_crises"),
            "escalations": _value(samples, "fieldgate_crisis_escalations_total"),
            "commits": self.engine.state.commits,
            "queues": {
                "in_flight": self.intake.in_flight,
                "pending_commit": self.engine.state.pending,
                "outbox": depth,
                "detection": waiting,
                "mqtt_outgoing": sum(session.outgoing_pending() for session in self.sessions),
            },
            "outbox": {"published": self.outbox.published, "failed": self.outbox.failed},
            "webhooks": {
                "delivered": self.webhooks.delivered,
                "failed": self.webhooks.failed,
                "dead": self.webhooks.dead,
                "pending": _sum(samples, "fieldgate_webhook_pending"),
                "dlq": _value(samples, "fieldgate_dlq_entries"),
                "spool": _value(samples, "fieldgate_dlq_spool"),
                "poster_restarts": _value(samples, "fieldgate_webhook_poster_restarts_total"),
            },
        }

    def announcement(self, state: str) -> dict[str, Any]:
        """The retained `<root>/status` message: `online` on every connect, `offline` as
        the will and on a clean stop."""
        return {
            "state": state,
            "version": __version__,
            "instance": self.settings().instance,
            "started_at": started_at_text(self.started_at),
        }


def _value(samples: list[Sample], name: str) -> int:
    """An unlabelled series' value (0 while it has none)."""
    return next((int(s.value) for s in samples if s.name == name and not s.labels), 0)


def _sum(samples: list[Sample], name: str) -> int:
    """A labelled gauge's sum over its labels."""
    return sum(int(s.value) for s in samples if s.name == name)


def _by_label(samples: list[Sample], name: str, label: str) -> dict[str, int]:
    return {s.labels[label]: int(s.value) for s in samples if s.name == name and label in s.labels}


def started_at_text(moment: datetime) -> str:
    return rfc3339(to_us(moment))


def _session_check(session: MqttSession) -> dict[str, Any]:
    """Up, and what the broker said of one session."""
    if not session.connected.is_set():
        return {"ok": False, "detail": session.last_error or "connecting"}
    check: dict[str, Any] = {
        "ok": not session.refused,
        "client_id": session.client_id,
        "reconnects": session.reconnects,
        "session_expiry_granted_s": session.expiry_granted_s,
    }
    if session.refused:
        check["detail"] = "subscription refused"
        check["subscription_refused"] = [
            {"filter": topic, "reason_code": code, "reason": reason}
            for topic, (code, reason) in sorted(session.refused.items())
        ]
    if session.session_lost_at is not None:
        check["session_lost"] = {"at": rfc3339(session.session_lost_at)}
    return check
