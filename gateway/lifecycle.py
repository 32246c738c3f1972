"""One lifecycle for every long-running part of the daemon.

A `Part` runs until asked to stop. `Parts` runs a list of them: started in
order, stopped in the reverse order (so that what feeds a part stops before
it, and the MQTT session, first in the list, stops last and can still
acknowledge what the others finish). A failure stays in its part: a critical
part (the session, the engine) stops the daemon, and systemd restarts it; any
other is logged and started again after a pause that grows.

`Loop` is the one wake-poll-backoff loop of the background parts (outbox
publisher, escalation, health report): sleep until poked or due, run a round,
back off while the database is away.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
from collections.abc import Sequence

import structlog
from sqlalchemy.exc import DBAPIError

log = structlog.get_logger("fieldgate.lifecycle")

STOP_TIMEOUT_S = 20.0
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0


def backoff(failures: int, low: float = RESTART_MIN_S, high: float = RESTART_MAX_S) -> float:
    """Full jitter: parts (or instances) that failed together do not retry together."""
    cap = min(high, low * 2 ** max(0, failures - 1))
    return round(random.uniform(low, max(cap, low)), 3)


class Part(abc.ABC):
    """A long-running piece of the daemon."""

    name: str = "part"
    critical: bool = False
    """Its failure stops the daemon (exit 1) instead of restarting the part."""
    ends_on_stop: bool = False
    """`run` returns by itself once `stop` was called (after a drain): it is waited
    for, not cancelled."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Work until cancelled; returning early means the part has nothing more to do."""

    async def stop(self) -> None:  # noqa: B027 - most parts need nothing before the cancel
        """Finish what is in hand; `run` is cancelled after this returns."""


class Parts:
    """Runs parts as tasks; `stop()` stops them in reverse order."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = list(parts)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failed = asyncio.Event()
        """Set when a critical part failed: the daemon should stop."""

    def start(self) -> None:
        for part in self.parts:
            self._tasks[part.name] = asyncio.create_task(self._guard(part), name=part.name)

    async def _guard(self, part: Part) -> None:
        failures = 0
        while True:
            try:
                await part.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("part failed", part=part.name, critical=part.critical)
                if part.critical:
                    self.failed.set()
                    return
            failures += 1
            delay = backoff(failures)
            log.warning("restarting part", part=part.name, in_s=delay)
            await asyncio.sleep(delay)

    def done(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and task.done()

    async def stop(self) -> None:
        """Stop every part, the last started first; each gets `STOP_TIMEOUT_S`."""
        for part in reversed(self.parts):
            try:
                await asyncio.wait_for(part.stop(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("part did not stop in time", part=part.name)
            except Exception:
                log.exception("part failed to stop", part=part.name)
            task = self._tasks.get(part.name)
            if task is None or task.done():
                continue
            if part.ends_on_stop:
                try:
                    await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT_S)
                    continue
                except TimeoutError:
                    log.error("part did not end in time", part=part.name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Loop(Part):
    """Sleeps until poked or its next round is due, then runs a round.

    A round that fails on the database or the network waits with backoff and
    runs again; any other error is a bug, and fails the part (see `Parts`).
    """

    def __init__(self) -> None:
        self._wake = asyncio.Event()
        self._failures = 0

    def poke(self) -> None:
        """There is new work: run a round now."""
        self._wake.set()

    async def ready(self) -> None:
        """Wait until a round can run (the broker is connected, say); at once by default."""

    @abc.abstractmethod
    async def round(self) -> float:
        """Do what is due; return the seconds until the next round unless poked."""

    async def run(self) -> None:
        while True:
            await self.ready()
            self._wake.clear()
            try:
                wait_s = await self.round()
                self._failures = 0
            except (DBAPIError, OSError) as exc:
                self._failures += 1
                wait_s = backoff(self._failures, 0.2, 5.0)
                log.warning(
                    f"{self.name} round failed", error=type(exc).__name__, retry_in_s=wait_s
                )
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
