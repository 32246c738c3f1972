"""The retained `<root>/health` report: health and stats together, every interval."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec

from gateway.lifecycle import Loop
from gateway.mqtt.session import MqttSession
from gateway.seam import Outbound
from gateway.status import Status

_encode = msgspec.json.Encoder().encode

ENGINE_START_S = 15.0
"""How long the first report waits for the engine process to serve."""


class HealthReport(Loop):
    """Publishes what `health` and `stats` answer, retained, so that a dashboard (or
    `fieldgate status` when the daemon does not answer) has the last known figures."""

    name = "health"

    def __init__(
        self, root: str, session: MqttSession, status: Status, interval_s: Callable[[], float]
    ) -> None:
        super().__init__()
        self.topic = f"{root}/health"
        self.session = session
        self.status = status
        self.interval_s = interval_s

    async def ready(self) -> None:
        """Connected, and the engine serving or given its start-up time: the first report
        should not say "starting" for a whole interval, nor wait for an engine that
        does not start."""
        await self.session.connected.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.status.engine.serving.wait(), ENGINE_START_S)

    async def round(self) -> float:
        data = {**await self.status.health(), **await self.status.stats()}
        self.session.publish(Outbound(self.topic, _encode(data), retain=True))
        return self.interval_s()
