"""The daemon: builds the parts, runs them, reloads on SIGHUP, drains on SIGTERM.

This is the one place that knows every part; each part is given what it uses.
The parts, in the order they start (and, reversed, stop):

    mqtt session -> outbox -> engine -> intake -> admin -> escalation -> outbox
    cleanup -> health report -> watchdog -> ready notice -> metrics endpoint

On a stop the intake stops taking messages first; then the parts stop in the
reverse order: the admin commands finish, the engine drains, the outbox
publishes what the drain leased, and the session, stopped last, still
acknowledges what the engine committed. Each part has its own stop timeout;
together they stay within systemd's TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import structlog
from redis.asyncio import Redis

from gateway import __version__, config, logs, systemd
from gateway.admin.alerts import AlertCommands
from gateway.admin.conflicts import ConflictCommands
from gateway.admin.quarantine import QuarantineCommands
from gateway.admin.server import AdminServer
from gateway.admin.sync import SyncCommands
from gateway.admin.system import SystemCommands
from gateway.ingest import rules
from gateway.ingest.engine import Engine
from gateway.ingest.kinds import Steps, table
from gateway.ingest.observe import Observers
from gateway.lifecycle import Parts
from gateway.metrics import Metrics, MetricsEndpoint
from gateway.mqtt.intake import Intake
from gateway.mqtt.session import MqttSession
from gateway.outbound.escalation import Escalator
from gateway.outbound.health_report import HealthReport
from gateway.outbound.outbox import OutboxPublisher
from gateway.outbound.outbox_cleanup import OutboxCleanup
from gateway.seam import WAKE_ESCALATION, WAKE_OUTBOX, Outbound
from gateway.status import Status
from gateway.systemd import ReadyNotice, Watchdog
from handlers.alerts import AlertHandler
from handlers.ratelimit import DeviceRateLimiter
from handlers.sync import SyncHandler
from storage import migrate
from storage.alerts import AlertStep, CrisisAckStep
from storage.conflict_store import ResolutionStep
from storage.db import create_engine, encoding_problem
from storage.sync import SyncStep
from storage.writer import Writer

log = structlog.get_logger("fieldgate.daemon")

_encode = msgspec.json.Encoder().encode


def _tune_gc() -> None:
    """Fewer, cheaper collections on the hot path.

    The gateway holds thousands of young objects in hand (messages waiting for
    their commit); at the default threshold (700) the collector scans them over
    and over: measured at 10-15 us per message. What exists after start-up
    (modules, config, engine) is frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


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

        # The engine: decode, store, detect, answer.
        self.rate_limiter = DeviceRateLimiter(
            settings.limits.device_rate, settings.limits.device_burst
        )
        self.sync = SyncHandler(rules.sync_limits(settings), self.rate_limiter)
        self.alerts = AlertHandler(rules.alert_rules(settings))
        self.detector = rules.make_detector(settings)
        self.steps = Steps(
            alerts=AlertStep(rules.alert_policy(settings), rules.alert_notices(settings)),
            crisis_acks=CrisisAckStep(),
            sync=SyncStep(self.detector),
            resolutions=ResolutionStep(rules.conflict_notices(settings)),
        )
        kinds = table(self.sync, self.alerts, self.steps, Observers(self.metrics))
        self.writer = Writer(self.database, self.steps.in_lock_order())
        self.engine = Engine(
            root,
            kinds,
            self.writer,
            settings.writer,
            self.metrics,
            beat_s=min(1.0, settings.health.wedged_after_s / 4),
        )

        # The MQTT side: the session, and the intake that routes what it receives.
        self.session = MqttSession(
            settings.mqtt,
            will=Outbound(f"{root}/status", _encode({"state": "offline"}), retain=True),
            last_words=lambda: self._announcement("offline"),
            on_connected=self._birth,
        )
        self.outbox = OutboxPublisher(self.database, self.session, on_sent=self._outbox_sent)
        self.escalator = Escalator(
            self.database,
            self.steps.alerts,
            self.metrics,
            self.outbox.poke,
            lambda: self.settings.alerts.escalation_poll_s,
        )
        self.intake = Intake(
            root,
            self.session,
            self.engine,
            [(kind.name, kind.pattern) for kind in kinds if kind.pattern is not None],
            max_in_process=settings.writer.max_in_process,
            metrics=self.metrics,
            wake={WAKE_OUTBOX: self.outbox.poke, WAKE_ESCALATION: self.escalator.poke},
            publish_leased=self.outbox.publish_leased,
        )
        self.status = Status(
            lambda: self.settings,
            started_at,
            session=self.session,
            intake=self.intake,
            engine=self.engine,
            writer=self.writer,
            database=self.database,
            redis=self.redis,
            metrics=self.metrics,
            outbox=self.outbox,
            trouble=self._trouble,
        )

        # Admin: one table of commands, each area given what it uses.
        commands = [
            *SystemCommands(
                self.status, lambda: self.settings, config_path, self.reload
            ).commands(),
            *QuarantineCommands(self.database).commands(),
            *SyncCommands(self.database).commands(),
            *AlertCommands(self.database, self.intake.call).commands(),
            *ConflictCommands(self.database, self.intake.call).commands(),
        ]
        self.admin = AdminServer(root, self.session, commands, self._token, self.metrics)
        self.intake.mount("admin/request/{command:path}", self.admin.request)
        self.intake.attach(settings.mqtt.shared_group)

        self.parts = Parts(
            [
                self.session,
                self.outbox,
                self.engine,
                self.intake,
                self.admin,
                self.escalator,
                OutboxCleanup(self.database, lambda: self.settings.outbox.retention_s),
                HealthReport(
                    root, self.session, self.status, lambda: self.settings.health.interval_s
                ),
                Watchdog(self.status.writer_alive),
                ReadyNotice(self.session.connected, settings.mqtt.host),
                MetricsEndpoint(self.metrics, settings.metrics.listen),
            ]
        )
        self._stop = asyncio.Event()

    def _trouble(self) -> dict[str, dict[str, object]]:
        """(Parts are made after Status, which is one of theirs.)"""
        return self.parts.trouble()

    def _token(self) -> str | None:
        token = self.settings.admin.token
        return token.get_secret_value() if token is not None else None

    def _announcement(self, state: str) -> Outbound:
        body = _encode(self.status.announcement(state))
        return Outbound(f"{self.settings.mqtt.topic_root}/status", body, retain=True)

    async def _birth(self, client: aiomqtt.Client) -> None:
        if self.session.epoch > 1:
            self.metrics.reconnects.inc()
        online = self._announcement("online")
        await client.publish(online.topic, online.payload, qos=1, retain=True)

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
        problem = await encoding_problem(self.database)
        if problem is not None:
            await self.database.dispose()
            raise config.ConfigError(problem)
        if self.settings.database.auto_upgrade:
            await migrate.upgrade_async(self.settings.database.url)
        _tune_gc()
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
        self.parts.start()
        stop = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(self.parts.failed.wait())
        await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failed.cancel()
        await self._shutdown()
        return 1 if self.parts.failed.is_set() else 0

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
        await self.writer.close()
        await self.database.dispose()
        log.info("stopped", drain_s=round(time.monotonic() - started, 3))

    def _reload_signal(self) -> None:
        with contextlib.suppress(config.ConfigError):
            self.reload()

    def reload(self) -> list[str]:
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
            for name in ("mqtt", "database", "redis", "writer", "metrics", "instance")
            if getattr(fresh, name) != getattr(self.settings, name)
        ]
        kept = {name: getattr(self.settings, name) for name in restart}
        settings = self.settings = fresh.model_copy(update=kept)
        logs.set_level(settings.log.level)
        self.sync.limits = rules.sync_limits(settings)
        self.alerts.rules = rules.alert_rules(settings)
        self.steps.alerts.policy = rules.alert_policy(settings)
        self.steps.alerts.notices = rules.alert_notices(settings)
        self.escalator.poke()
        self.rate_limiter.rate = settings.limits.device_rate
        self.rate_limiter.burst = float(settings.limits.device_burst)
        self.detector.rules = rules.conflict_rules(settings)
        self.detector.notices = rules.conflict_notices(settings)
        self.detector.enabled = settings.conflicts.enabled
        self.steps.resolutions.notices = self.detector.notices
        log.info("config reloaded", needs_restart=restart or None)
        return restart
