"""The daemon: builds the parts, runs them, reloads on SIGHUP, drains on SIGTERM.

This is the one place that knows every part; each part is given what it uses.
The parts, in the order they start (and, reversed, stop):

    mqtt sessions (sync lane, priority lane) -> outbox -> dead letters -> webhooks
    -> engine -> intake -> admin -> escalation -> outbox cleanup
    -> quarantine cleanup -> retraining -> health report -> watchdog -> ready notice
    -> status line -> metrics endpoint

On a stop the intake stops taking messages first; then the parts stop in the
reverse order: the admin commands finish, the engine drains, the outbox
publishes what the drain leased, and the sessions, stopped last, still
acknowledge what the engine committed (the priority one publishing the last
words). Each part has its own stop timeout; together they stay within systemd's
TimeoutStopSec (tests/test_shipped_files.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import structlog
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError

from gateway import __version__, config, logs, systemd
from gateway.admin.alerts import AlertCommands
from gateway.admin.conflicts import ConflictCommands
from gateway.admin.dlq import DlqCommands
from gateway.admin.ml import MlCommands
from gateway.admin.quarantine import QuarantineCommands
from gateway.admin.server import AdminServer
from gateway.admin.sync import SyncCommands
from gateway.admin.system import SystemCommands
from gateway.admin.webhooks import WebhookCommands
from gateway.ingest import rules
from gateway.lifecycle import GC_YOUNG_MQTT, Parts, tune_gc
from gateway.metrics import Metrics, MetricsEndpoint
from gateway.mqtt.client import TlsFileError, tls_context
from gateway.mqtt.engine_process import EngineProcess
from gateway.mqtt.intake import Intake
from gateway.mqtt.session import MqttSession, priority_client_id
from gateway.outbound.dead_letters import DeadLetters
from gateway.outbound.escalation import Escalator
from gateway.outbound.health_report import HealthReport
from gateway.outbound.outbox import OutboxPublisher
from gateway.outbound.poster_process import PosterProcess
from gateway.outbound.training import Retraining, Trainer
from gateway.outbound.webhook_sender import WebhookSender
from gateway.retention import Retention
from gateway.seam import (
    KIND_LANES,
    KIND_PATTERNS,
    LANE_PRIORITY,
    LANE_SYNC,
    WAKE_ESCALATION,
    WAKE_OUTBOX,
    Outbound,
)
from gateway.status import Status
from gateway.systemd import ReadyNotice, StatusLine, Watchdog
from storage import migrate, outbox, quarantine
from storage.alerts import AlertStep
from storage.db import create_engine, encoding_problem

log = structlog.get_logger("fieldgate.daemon")

WARM_POLL_S = 1.0
"""How often the poster's warm start looks whether a backlog still drains."""
OUTBOX_WAKE_S = 0.05
"""The least time between two wakes of the outbox and the webhooks' fan-out."""

_encode = msgspec.json.Encoder().encode


class Daemon:
    """Owns every long-lived part and the order in which they start and stop."""

    def __init__(self, settings: config.Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        started_at = datetime.now(UTC)
        root = settings.mqtt.topic_root
        self.metrics = Metrics()
        self.database = create_engine(
            settings.database.url,
            echo=settings.database.echo,
            pool_size=settings.database.pool_size,
        )
        self.redis = Redis.from_url(
            settings.redis.url.get_secret_value(), socket_connect_timeout=2, socket_timeout=2
        )

        # The engine: decode, store, detect, answer; in a process of its own.
        self.engine = EngineProcess(
            lambda: self.settings,
            self.metrics,
            beat_s=min(1.0, settings.health.wedged_after_s / 4),
        )

        # The MQTT side: a session per lane, and the intake that routes what they receive.
        # The sync lane takes the devices' operations and publishes their answers; the
        # priority lane takes alerts and admin requests, and publishes the outbox (crises
        # first), the admin answers and the gateway's status. The sync lane connects once
        # the priority lane is up and the engine serves (MqttSession's `after`).
        self.priority = MqttSession(
            settings.mqtt,
            lane=LANE_PRIORITY,
            client_id=priority_client_id(settings.mqtt.client_id),
            will=Outbound(f"{root}/status", _encode({"state": "offline"}), retain=True),
            last_words=lambda: self._announcement("offline"),
            on_connected=self._birth,
        )
        self.session = MqttSession(
            settings.mqtt,
            lane=LANE_SYNC,
            on_connected=self._counted_reconnect,
            after=(self.priority.connected, self.engine.serving),
        )
        self.outbox = OutboxPublisher(self.database, self.priority, on_sent=self._outbox_sent)
        for lane in (LANE_SYNC, LANE_PRIORITY):
            self.metrics.reconnects.labels(lane)  # both series from the start, at 0

        # Webhooks: events fanned out to the endpoints; the dead ones to Redis.
        self.poster = PosterProcess(
            settings.log.level,
            settings.log.format,
            on_restart=self.metrics.webhook_poster_restarts.inc,
        )
        self.dead_letters = DeadLetters(
            self.database, self.redis, lambda: self.settings, self.metrics
        )
        self.escalation = AlertStep(rules.alert_policy(settings), rules.alert_notices(settings))
        self.escalator = Escalator(
            self.database,
            self.escalation,
            self.metrics,
            self._outbox_written,
            lambda: self.settings.alerts.escalation_poll_s,
        )
        self.intake = Intake(
            root,
            {LANE_SYNC: self.session, LANE_PRIORITY: self.priority},
            self.engine,
            [
                (name, pattern, KIND_LANES[name])
                for name, pattern in KIND_PATTERNS.items()
                if pattern is not None
            ],
            max_in_process=settings.writer.max_in_process,
            metrics=self.metrics,
            wake={WAKE_OUTBOX: self._outbox_written, WAKE_ESCALATION: self.escalator.poke},
            publish_leased=self._leased_written,
        )
        self.webhooks = WebhookSender(
            self.database,
            lambda: self.settings,
            self.poster,
            self.metrics,
            on_dead=self._dead_delivery,
            behind=self.intake.behind,
        )
        self.status = Status(
            lambda: self.settings,
            started_at,
            sessions=[self.session, self.priority],
            intake=self.intake,
            engine=self.engine,
            database=self.database,
            redis=self.redis,
            metrics=self.metrics,
            outbox=self.outbox,
            webhooks=self.webhooks,
            trouble=self._trouble,
        )

        # Conflict prediction: training runs (commands and the schedule share them).
        self.trainer = Trainer(
            self.database,
            lambda: self.settings,
            self._outbox_written,
            activated=lambda: self.engine.reload(self.settings),
        )
        self.retraining = Retraining(self.trainer)

        # Admin: one table of commands, each area given what it uses.
        commands = [
            *SystemCommands(
                self.status, lambda: self.settings, config_path, self.reload, self.set_log_level
            ).commands(),
            *QuarantineCommands(self.database).commands(),
            *SyncCommands(self.database).commands(),
            *AlertCommands(self.database, self.intake.call).commands(),
            *ConflictCommands(self.database, self.intake.call).commands(),
            *DlqCommands(
                self.redis, self.poster, lambda: self.settings, self.priority, root
            ).commands(),
            *WebhookCommands(self.webhooks).commands(),
            *MlCommands(self.database, self.trainer).commands(),
        ]
        self.admin = AdminServer(root, self.priority, commands, self._token, self.metrics)
        self.intake.mount("admin/request/{command:path}", self.admin.request, LANE_PRIORITY)
        self.intake.attach(settings.mqtt.shared_group)

        ready = ReadyNotice(
            settings.mqtt.host, self.session.connected, self.priority.connected, self.engine.serving
        )
        self.parts = Parts(
            [
                self.session,
                self.priority,
                self.outbox,
                self.dead_letters,
                self.webhooks,
                self.engine,
                self.intake,
                self.admin,
                self.escalator,
                Retention(
                    "outbox-cleanup",
                    self.database,
                    lambda: self.settings.outbox.retention_s,
                    outbox.prune,
                ),
                Retention(
                    "quarantine-cleanup",
                    self.database,
                    lambda: self.settings.quarantine.retention_s,
                    lambda database, before_us, limit: quarantine.prune(
                        database,
                        before_us,
                        limit,
                        self.settings.quarantine.max_rows,
                        self.metrics.quarantine_dropped.inc,
                    ),
                ),
                self.retraining,
                HealthReport(
                    root, self.priority, self.status, lambda: self.settings.health.interval_s
                ),
                Watchdog(self.status.engine_trouble, self.engine.serving),
                ready,
                StatusLine(ready, self.status.unhealthy),
                MetricsEndpoint(self.metrics, settings.metrics.listen),
            ]
        )
        self._stop = asyncio.Event()
        self._reloads: set[asyncio.Future[None]] = set()
        self._outbox_wake: asyncio.TimerHandle | None = None
        self._outbox_woken = 0.0

    def _trouble(self) -> dict[str, dict[str, object]]:
        """(Parts are made after Status, which is one of theirs.)"""
        return self.parts.trouble()

    def _outbox_written(self) -> None:
        """A commit wrote outbox rows: messages for the broker, events for webhooks.

        At most one wake every `OUTBOX_WAKE_S`, the first at once: at a steady load
        every detection pass writes a few rows, and a round of each loop per pass (a
        claim, a mark, a fan-out) was a sixth of the MQTT process's CPU at 2,000 ops/s.
        Crisis alerts do not wait for it: their rows come leased with the commit
        (`_leased_written`)."""
        if self._outbox_wake is not None:
            return
        loop = asyncio.get_running_loop()
        delay = self._outbox_woken + OUTBOX_WAKE_S - loop.time()
        if delay <= 0:
            self._wake_outbox()
        else:
            self._outbox_wake = loop.call_later(delay, self._wake_outbox)

    def _leased_written(self, rows: list[dict[str, Any]]) -> None:
        """A commit wrote rows that cannot wait (crisis alerts): published at once, and
        the webhooks' fan-out woken at once for their events, past `OUTBOX_WAKE_S`."""
        self.outbox.publish_leased(rows)
        self.webhooks.poke()

    def _wake_outbox(self) -> None:
        self._outbox_wake = None
        self._outbox_woken = asyncio.get_running_loop().time()
        self.outbox.poke()
        self.webhooks.poke()

    def _dead_delivery(self) -> None:
        """A delivery died: its `webhook.dead` notice is in the outbox, its entry in the
        spool for Redis."""
        self.outbox.poke()
        self.dead_letters.poke()

    def _token(self) -> str | None:
        token = self.settings.admin.token
        return token.get_secret_value() if token is not None else None

    def _announcement(self, state: str) -> Outbound:
        body = _encode(self.status.announcement(state))
        return Outbound(f"{self.settings.mqtt.topic_root}/status", body, retain=True)

    async def _counted_reconnect(self, _client: aiomqtt.Client) -> None:
        if self.session.epoch > 1:
            self.metrics.reconnects.labels(LANE_SYNC).inc()

    async def _birth(self, _client: aiomqtt.Client) -> None:
        if self.priority.epoch > 1:
            self.metrics.reconnects.labels(LANE_PRIORITY).inc()
        # Not awaited: behind a kept session's backlog its PUBACK comes late (MqttSession).
        self.priority.publish(self._announcement("online"))

    def _outbox_sent(self, rows: list[dict[str, Any]], acked_us: int) -> None:
        """Receipt-to-publication of crisis alerts: from the device's message to PUBACK."""
        for row in rows:
            if row["event_type"] == "alert.crisis" and row["origin_at"] is not None:
                self.metrics.crisis_publish_seconds.observe((acked_us - row["origin_at"]) / 1e6)

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT or a critical part fails; 0 on a clean stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
        try:
            tls_context(self.settings.mqtt)  # the TLS files load, or the start stops here
        except TlsFileError as exc:
            await self.database.dispose()
            raise config.ConfigError(
                f"config {self.config_path or config.DEFAULT_CONFIG_PATH}: {exc}"
            ) from None
        try:
            problem = await encoding_problem(self.database)
            if problem is None and self.settings.database.auto_upgrade:
                await migrate.upgrade_async(self.settings.database.url)
        except (DBAPIError, OSError) as exc:
            # Down or unreachable at start: one line, and exit 1 so that systemd starts
            # it again (RestartSec) until the database is back.
            await self.database.dispose()
            log.error(
                "the database cannot be reached at start",
                database=config.hide_url_password(self.settings.database.url),
                error=type(exc).__name__,
                detail=str(getattr(exc, "orig", exc)).partition("\n")[0][:200],
            )
            return 1
        if problem is not None:
            await self.database.dispose()
            raise config.ConfigError(problem)
        tune_gc(GC_YOUNG_MQTT)
        log.info(
            "starting",
            version=__version__,
            instance=self.settings.instance,
            database=config.hide_url_password(self.settings.database.url),
            broker=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}",
        )
        if self.settings.conflicts.cache_max_ops is not None:
            log.warning(
                "conflicts.cache_max_ops is no longer used: conflicts v2 keep their windows"
                " in the database; remove the key"
            )
        async with self.poster:
            self.parts.start()
            warming = asyncio.ensure_future(self._warm_poster())
            stop = asyncio.ensure_future(self._stop.wait())
            failed = asyncio.ensure_future(self.parts.failed.wait())
            await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            failed.cancel()
            warming.cancel()
            await self._shutdown()
        return 1 if self.parts.failed.is_set() else 0

    async def _warm_poster(self) -> None:
        """Start the webhook poster process once the engine serves and no backlog is
        draining, when an endpoint is enabled: its start (~0.4 s of CPU) would take the
        cores from the engine's and from the backlog's (webhooks yield to it meanwhile;
        a crisis event starts it at once). Not at the first event, which would wait."""
        await self.engine.serving.wait()
        while self.intake.behind():  # noqa: ASYNC110 - a state computed on demand, no event
            await asyncio.sleep(WARM_POLL_S)
        if any(endpoint.enabled for endpoint in self.settings.webhooks):
            try:
                await self.poster.warm()
            except OSError as exc:  # the first attempt tries again, and says so
                log.warning("webhook poster process did not start", error=str(exc))

    def request_stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            systemd.notify("STOPPING=1")
            log.info("stopping: draining what is in hand")

    async def _shutdown(self) -> None:
        started = time.monotonic()
        # Take no more messages first (the session stops reading), then stop the parts.
        await self.intake.stop()
        await self.parts.stop()
        await self.redis.aclose()
        await self.database.dispose()
        log.info("stopped", drain_s=round(time.monotonic() - started, 3))

    async def set_log_level(self, level: str) -> None:
        """Both processes log at `level` until the next reload or restart."""
        log_config = self.settings.log.model_copy(update={"level": level})
        self.settings = self.settings.model_copy(update={"log": log_config})
        logs.set_level(level)
        await self.engine.reload(self.settings)

    def _reload_signal(self) -> None:
        task = asyncio.ensure_future(self._reload_quietly())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(config.ConfigError):
            await self.reload()

    async def reload(self) -> list[str]:
        """Apply what can change safely at run time; return what needs a restart.

        Raises ConfigError (and changes nothing) when the new file is bad.
        """
        try:
            fresh = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload refused", reason=str(exc))
            raise
        restart = [
            name
            for name in ("mqtt", "database", "redis", "writer", "engine", "metrics", "instance")
            if getattr(fresh, name) != getattr(self.settings, name)
        ]
        kept = {name: getattr(self.settings, name) for name in restart}
        settings = self.settings = fresh.model_copy(update=kept)
        logs.set_level(settings.log.level)
        self.escalation.policy = rules.alert_policy(settings)
        self.escalation.notices = rules.alert_notices(settings)
        self.escalator.poke()
        self.webhooks.reconfigure()
        self.retraining.poke()
        await self.engine.reload(settings)
        log.info("config reloaded", needs_restart=restart or None)
        return restart
