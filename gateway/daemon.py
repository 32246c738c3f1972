"""The daemon's lifecycle: start, serve, reload on SIGHUP, drain on SIGTERM."""

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

from gateway import __version__, config, logs, systemd
from gateway.ingest import Ingest
from gateway.metrics import Metrics
from gateway.mqtt import Inbound, MqttSession, Outbound
from gateway.router import Route, Router
from handlers.ratelimit import DeviceRateLimiter
from handlers.sync import Limits, SyncHandler
from storage import migrate
from storage.db import create_engine
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
        self.writer = Writer(self.engine)
        self.rate_limiter = DeviceRateLimiter(
            settings.limits.device_rate, settings.limits.device_burst
        )
        self.sync = SyncHandler(sync_limits(settings), self.rate_limiter)
        self.router = Router(self.root, [Route("devices/{device_id}/sync", self._sync)])
        self.session = MqttSession(
            settings.mqtt,
            self.router.subscriptions(settings.mqtt.shared_group),
            self._dispatch,
            will=Outbound(self.status_topic, _encode({"state": "offline"}), retain=True),
            on_connected=self._birth,
        )
        self.ingest = Ingest(
            self.root, self.session, self.writer, self.sync, settings.writer, self.metrics
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def status_topic(self) -> str:
        return f"{self.root}/status"

    def status(self, state: str) -> dict[str, Any]:
        return {
            "state": state,
            "version": __version__,
            "instance": self.settings.instance,
            "started_at": self.started_at.isoformat().replace("+00:00", "Z"),
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

    async def _birth(self, client: aiomqtt.Client) -> None:
        if self.session.epoch > 1:
            self.metrics.reconnects.inc()
        await client.publish(self.status_topic, _encode(self.status("online")), qos=1, retain=True)

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if self.settings.database.auto_upgrade:
            await migrate.upgrade_async(self.settings.database.url)
        log.info(
            "starting",
            version=__version__,
            instance=self.settings.instance,
            database=config.hide_url_password(self.settings.database.url),
            broker=f"{self.settings.mqtt.host}:{self.settings.mqtt.port}",
        )
        session_task = asyncio.create_task(self.session.run(), name="mqtt")
        ingest_task = asyncio.create_task(self.ingest.run(), name="ingest")
        self._tasks = [session_task, ingest_task]
        ready = asyncio.create_task(self._ready_when_connected(), name="ready")
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait(
            {stop, session_task, ingest_task}, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        crashed = [t for t in done if t is not stop and t.exception() is not None]
        for task in crashed:
            log.error("task failed", task=task.get_name(), exc_info=task.exception())
        await self._shutdown(session_task, ingest_task)
        return 1 if crashed else 0

    async def _ready_when_connected(self) -> None:
        await self.session.connected.wait()
        systemd.notify(f"READY=1\nSTATUS=serving on {self.settings.mqtt.host}")
        log.info("ready")

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
        await self.ingest.drain()
        if not ingest_task.done():
            try:
                await asyncio.wait_for(ingest_task, timeout=20)
            except TimeoutError:
                log.error("drain timed out; unacked messages will be redelivered")
        await self.session.stop(
            Outbound(self.status_topic, _encode(self.status("offline")), retain=True)
        )
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(session_task, timeout=10)
        await self.engine.dispose()
        log.info("stopped", drain_s=round(time.monotonic() - started, 3))

    def reload(self) -> None:
        """Apply what can change safely at run time; name what needs a restart."""
        try:
            fresh = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload refused", reason=str(exc))
            return
        logs.set_level(fresh.log.level)
        self.sync.limits = sync_limits(fresh)
        self.rate_limiter.rate = fresh.limits.device_rate
        self.rate_limiter.burst = float(fresh.limits.device_burst)
        restart = [
            name
            for name in ("mqtt", "database", "redis", "writer", "metrics", "instance")
            if getattr(fresh, name) != getattr(self.settings, name)
        ]
        self.settings = fresh.model_copy(
            update={name: getattr(self.settings, name) for name in restart}
        )
        log.info("config reloaded", needs_restart=restart or None)
