"""The daemon's lifecycle: start, serve, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import structlog
from prometheus_client import start_http_server
from redis.asyncio import Redis

from gateway import __version__, config, health, logs, systemd
from gateway.admin import AdminServer
from gateway.commands import TABLE
from gateway.conflicts import make_detector, rules_from
from gateway.escalation import Escalator
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.mqtt import Inbound, MqttSession, Outbound
from gateway.outbox import OutboxPublisher
from gateway.router import Route, Router
from gateway.services import Services
from handlers.alerts import AlertHandler, AlertRules
from handlers.ratelimit import DeviceRateLimiter
from handlers.sync import Limits, SyncHandler
from storage import migrate
from storage.alerts import AlertPolicy
from storage.db import create_engine, encoding_problem
from storage.writer import Writer

log = structlog.get_logger("fieldgate.daemon")

_encode = msgspec.json.Encoder().encode


def sync_limits(settings: config.Settings) -> Limits:
    lim = settings.limits
    return Limits(
        max_payload_bytes=lim.max_payload_bytes,
        max_ops=lim.max_ops_per_batch,
        max_clock_skew_us=int(lim.max_clock_skew_s * 1_000_000),
        max_device_meta_bytes=lim.max_device_meta_bytes,
        entity_types=frozenset(settings.sync.entity_types),
    )


def _tune_gc() -> None:
    """Fewer, cheaper collections on the hot path.

    The gateway holds thousands of young objects in hand (messages waiting for
    their commit); at the default threshold (700) the collector scans them over
    and over: measured at 10-15 us per message. What exists after start-up
    (modules, config, engine) is frozen out of every collection.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def alert_rules(settings: config.Settings) -> AlertRules:
    cfg = settings.alerts
    return AlertRules(
        crisis_kinds=frozenset(cfg.crisis_kinds),
        crisis_flags=tuple(cfg.crisis_flags),
        crisis_mood_max=cfg.crisis_mood_max,
        crisis_stress_min=cfg.crisis_stress_min,
        wellness_mood_max=cfg.wellness_mood_max,
        wellness_stress_min=cfg.wellness_stress_min,
        max_payload_bytes=settings.limits.max_payload_bytes,
        max_note_bytes=cfg.max_note_bytes,
    )


def alert_policy(settings: config.Settings) -> AlertPolicy:
    cfg = settings.alerts
    return AlertPolicy(
        root=settings.mqtt.topic_root,
        low_mood_max=cfg.wellness_mood_max,
        sustained_entries=cfg.sustained_low_mood_entries,
        sustained_window_us=int(cfg.sustained_low_mood_days * 86_400_000_000),
        escalate_after_us=int(cfg.escalate_after_s * 1_000_000),
        max_escalations=cfg.max_escalations,
        wellness_cooldown_us=int(cfg.wellness_cooldown_s * 1_000_000),
        suggestions=cfg.suggestions.model_dump(),
    )


def iso_now(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class Daemon:
    """Owns every long-lived part and the order in which they start and stop."""

    def __init__(self, settings: config.Settings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.started_at = datetime.now(UTC)
        self.metrics = Metrics()
        self.root = settings.mqtt.topic_root
        self.engine = create_engine(
            settings.database.url,
            echo=settings.database.echo,
            pool_size=settings.database.pool_size,
        )
        self.detector = make_detector(settings)
        self.writer = Writer(self.engine, self.detector, alert_policy(settings))
        self.rate_limiter = DeviceRateLimiter(
            settings.limits.device_rate, settings.limits.device_burst
        )
        self.sync = SyncHandler(sync_limits(settings), self.rate_limiter)
        self.alerts = AlertHandler(alert_rules(settings))
        self.router = Router(
            self.root,
            [
                Route("devices/{device_id}/sync", self._sync),
                Route("devices/{device_id}/alerts", self._alert),
                Route("alerts/crisis/ack", self._crisis_ack),
                Route("admin/request/{command:path}", self._admin),
            ],
        )
        self.session = MqttSession(
            settings.mqtt,
            self.router.subscriptions(settings.mqtt.shared_group),
            self._dispatch,
            will=Outbound(self.status_topic, _encode({"state": "offline"}), retain=True),
            on_connected=self._birth,
        )
        self.outbox = OutboxPublisher(self.engine, self.session, on_sent=self._outbox_sent)
        self.escalator = Escalator(
            self.engine,
            lambda: self.writer.alert_policy,
            self.metrics,
            self.outbox.poke,
            lambda: self.settings.alerts.escalation_poll_s,
        )
        self.ingest = Ingest(
            self.root,
            self.session,
            self.writer,
            self.sync,
            settings.writer,
            self.metrics,
            on_outbox=self.outbox.poke,
            beat_s=min(1.0, settings.health.wedged_after_s / 4),
            alerts=self.alerts,
            on_crisis=self.escalator.poke,
            publish_leased=self.outbox.publish_leased,
        )
        self.services = Services(
            settings=settings,
            config_path=config_path,
            started_at=self.started_at,
            engine=self.engine,
            metrics=self.metrics,
            session=self.session,
            writer=self.writer,
            ingest=self.ingest,
            outbox=self.outbox,
            escalator=self.escalator,
            redis=Redis.from_url(
                settings.redis.url.get_secret_value(), socket_connect_timeout=2, socket_timeout=2
            ),
            reload=self.reload,
        )
        self.admin = AdminServer(self.services, TABLE, self.ingest.hold, self.ingest.release)
        self._stop = asyncio.Event()
        self._helper_failed = False

    @property
    def status_topic(self) -> str:
        return f"{self.root}/status"

    def status(self, state: str) -> dict[str, Any]:
        return {
            "state": state,
            "version": __version__,
            "instance": self.settings.instance,
            "started_at": iso_now(self.started_at),
        }

    # -- routing -------------------------------------------------------------

    def _dispatch(self, message: Inbound) -> None:
        resolved = self.router.resolve(message.topic)
        if resolved is None:
            ticket = self.ingest.hold(message)
            if ticket is not None:
                self.ingest.release([ticket])
            return
        endpoint, params = resolved
        endpoint(message, params)

    def _sync(self, message: Inbound, params: dict[str, str]) -> None:
        self.ingest.sync_message(message, params)

    def _alert(self, message: Inbound, params: dict[str, str]) -> None:
        self.ingest.alert_message(message, params)

    def _crisis_ack(self, message: Inbound, params: dict[str, str]) -> None:
        self.ingest.crisis_ack_message(message, params)

    def _outbox_sent(self, rows: list[dict[str, Any]], acked_us: int) -> None:
        """Receipt-to-publication of crisis alerts: from the device's message to PUBACK."""
        for row in rows:
            if row["event_type"] == "alert.crisis" and row["origin_at"] is not None:
                self.metrics.crisis_publish_seconds.observe((acked_us - row["origin_at"]) / 1e6)

    def _admin(self, message: Inbound, params: dict[str, str]) -> None:
        self.admin.request(message, params)

    async def _birth(self, client: aiomqtt.Client) -> None:
        if self.session.epoch > 1:
            self.metrics.reconnects.inc()
        await client.publish(self.status_topic, _encode(self.status("online")), qos=1, retain=True)

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
        problem = await encoding_problem(self.engine)
        if problem is not None:
            await self.engine.dispose()
            raise config.ConfigError(problem)
        if self.settings.database.auto_upgrade:
            await migrate.upgrade_async(self.settings.database.url)
        warmed = await self.detector.warm(self.engine, time.time_ns() // 1000)
        self._serve_metrics()
        _tune_gc()
        log.info(
            "starting",
            version=__version__,
            instance=self.settings.instance,
            database=config.hide_url_password(self.settings.database.url),
            broker=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}",
            conflict_cache=None if self.detector.cache is None else warmed,
        )
        session_task = self._task(self.session.run(), "mqtt")
        ingest_task = self._task(self.ingest.run(), "ingest")
        helpers = {
            self._task(self.outbox.run(), "outbox"),
            self._task(self.escalator.run(), "escalation"),
            self._task(self._ready_when_connected(), "ready"),
            self._task(self._publish_health(), "health"),
            self._task(self._watchdog(), "watchdog"),
        }
        stop = self._task(self._stop.wait(), "stop")
        core = {session_task, ingest_task}
        done, _ = await asyncio.wait(core | {stop}, return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stop and not t.cancelled() and t.exception()]
        for task in helpers:
            task.cancel()
        await self._shutdown(session_task, ingest_task)
        return 1 if crashed or self._helper_failed else 0

    def _task(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_ended)
        return task

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """A task that dies with an error is logged and stops the daemon: systemd restarts it."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("task failed", task=task.get_name(), exc_info=task.exception())
        self._helper_failed = True
        self.request_stop()

    def _serve_metrics(self) -> None:
        listen = self.settings.metrics.listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
        log.info("metrics endpoint", listen=listen)

    async def _ready_when_connected(self) -> None:
        await self.session.connected.wait()
        systemd.notify(f"READY=1\nSTATUS=serving on {self.settings.mqtt.host}")
        log.info("ready")

    async def _publish_health(self) -> None:
        topic = f"{self.root}/health"
        while True:
            await self.session.connected.wait()
            data = {**await health.health(self.services), **await health.stats(self.services)}
            self.session.publish(Outbound(topic, _encode(data), retain=True))
            await asyncio.sleep(self.settings.health.interval_s)

    async def _watchdog(self) -> None:
        """Ping systemd while the loop runs and the writer loop is not wedged."""
        interval = systemd.watchdog_interval_s()
        if interval is None:
            return
        while True:
            if health.writer_alive(self.services):
                systemd.notify("WATCHDOG=1")
            else:
                log.error("writer wedged: withholding watchdog pings")
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stopping: draining what is in hand")
            systemd.notify("STOPPING=1")
            self._stop.set()

    async def _shutdown(
        self, session_task: asyncio.Task[Any], ingest_task: asyncio.Task[Any]
    ) -> None:
        started = time.monotonic()
        self.session.pause_reading()
        await self.admin.close()
        await self.ingest.drain()
        if not ingest_task.done():
            try:
                await asyncio.wait_for(ingest_task, timeout=20)
            except TimeoutError:
                log.error("drain timed out; unacked messages will be redelivered")
        offline = Outbound(self.status_topic, _encode(self.status("offline")), retain=True)
        await self.session.stop(offline)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(session_task, timeout=10)
        await self.services.redis.aclose()
        await self.writer.close()
        await self.engine.dispose()
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
        logs.set_level(fresh.log.level)
        self.sync.limits = sync_limits(fresh)
        self.alerts.rules = alert_rules(fresh)
        self.writer.alert_policy = alert_policy(fresh)
        self.escalator.poke()
        self.rate_limiter.rate = fresh.limits.device_rate
        self.rate_limiter.burst = float(fresh.limits.device_burst)
        self.detector.rules = rules_from(fresh)
        self.detector.enabled = fresh.conflicts.enabled
        restart = [
            name
            for name in ("mqtt", "database", "redis", "writer", "metrics", "instance")
            if getattr(fresh, name) != getattr(self.settings, name)
        ]
        kept = {name: getattr(self.settings, name) for name in restart}
        self.settings = fresh.model_copy(update=kept)
        self.services.settings = self.settings
        log.info("config reloaded", needs_restart=restart or None)
        return restart
