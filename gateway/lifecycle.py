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
import gc
import random
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError

log = structlog.get_logger("fieldgate.lifecycle")
T = TypeVar("T")

STOP_TIMEOUT_S = 1.0
"""A part's default time to stop (its `stop()`, then its run ending or being
cancelled). Parts that finish work on a stop take more (the engine 20 s to drain,
the session 6 s for its last words, the outbox 5 s); the sum over all the parts
stays under systemd's TimeoutStopSec (systemd/fieldgate.service, checked by
tests/test_shipped_files.py). A part that ignores its cancellation adds at most
CANCEL_TRIES x CANCEL_WAIT_S."""
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
TROUBLE_S = 300.0
"""A part that failed this recently makes the daemon unhealthy (Parts.trouble)."""

CANCEL_TRIES = 3
CANCEL_WAIT_S = 0.5
"""A part's task that does not end within this of being cancelled is cancelled again,
CANCEL_TRIES times in all; then the stop goes on without it (`_cancel`)."""


def backoff(failures: int, low: float = RESTART_MIN_S, high: float = RESTART_MAX_S) -> float:
    """Full jitter: parts (or instances) that failed together do not retry together."""
    cap = min(high, low * 2 ** max(0, failures - 1))
    return round(random.uniform(low, max(cap, low)), 3)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end on uvloop where it is installed (each process of the
    daemon: its loop does the socket work)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


GC_YOUNG_MQTT = 50_000
"""The MQTT process's young-generation threshold: it holds thousands of messages in
hand, and at the default (700) the collector walked them over and over (10-15 µs a
message, docs/benchmarks.md "Where the time goes")."""

GC_YOUNG_ENGINE = 3_000
"""The engine's: its heap is large (the member cache holds up to 200,000 operations),
and a collection of 50,000 young objects there took 50-90 ms, the older generation's
280-300 ms, while a crisis waited behind it (crisis p99 58-112 ms at 1,000 sync ops/s;
27 ms at 3,000, the drain 2% slower: docs/decisions/0015-engine-gc.md)."""


def tune_gc(young: int) -> None:
    """Fewer, cheaper collections on the hot path: what exists after start-up (modules,
    config, parts) is frozen out of every collection, and a young generation of
    `young` objects (GC_YOUNG_MQTT, GC_YOUNG_ENGINE). Collections are enabled here:
    `fieldgate run` starts without them (gateway/__main__.py)."""
    gc.freeze()
    gc.set_threshold(young, 20, 100)
    gc.enable()


class Part(abc.ABC):
    """A long-running piece of the daemon."""

    name: str = "part"
    critical: bool = False
    """Its failure stops the daemon (exit 1) instead of restarting the part."""
    ends_on_stop: bool = False
    """`run` returns by itself once `stop` was called (after a drain): it is waited
    for, not cancelled."""
    stop_timeout_s: float = STOP_TIMEOUT_S
    """How long `stop()` and then the end of `run` may take, together."""

    @abc.abstractmethod
    async def run(self) -> None:
        """Work until cancelled; returning early means the part has nothing more to do."""

    async def stop(self) -> None:  # noqa: B027 - most parts need nothing before the cancel
        """Finish what is in hand. Then `run` is cancelled, or, for an `ends_on_stop`
        part, waited for (within what is left of `stop_timeout_s`)."""


@dataclass
class Failing:
    """A part that failed and was restarted: how often in a row, the last error, when."""

    failures: int
    error: str
    at: float


class Parts:
    """Runs parts as tasks; `stop()` stops them in reverse order."""

    def __init__(self, parts: Sequence[Part]) -> None:
        names = [part.name for part in parts]
        assert len(set(names)) == len(names), f"part names repeat: {names}"
        self.parts = list(parts)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.failing: dict[str, Failing] = {}
        """Parts that failed and were restarted (a critical one stops the daemon)."""
        self.failed = asyncio.Event()
        """Set when a critical part failed: the daemon should stop."""

    def start(self) -> None:
        for part in self.parts:
            self._tasks[part.name] = asyncio.create_task(self._guard(part), name=part.name)

    async def _guard(self, part: Part) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await part.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("part failed", part=part.name, critical=part.critical)
                if part.critical:
                    self.failed.set()
                    return
                # a part that ran well for a while before failing starts its count again
                failures = 1 if time.monotonic() - started > RESTART_MAX_S else failures + 1
                self.failing[part.name] = Failing(failures, type(exc).__name__, time.monotonic())
            delay = backoff(failures)
            log.warning("restarting part", part=part.name, in_s=delay, failures=failures)
            await asyncio.sleep(delay)

    def trouble(self) -> dict[str, dict[str, object]]:
        """Parts that failed within TROUBLE_S: for health, which they make unhealthy."""
        now = time.monotonic()
        return {
            name: {"failures": f.failures, "error": f.error, "ago_s": round(now - f.at, 1)}
            for name, f in sorted(self.failing.items())
            if now - f.at < TROUBLE_S
        }

    async def stop(self) -> None:
        """Stop every part, the last started first, each within its `stop_timeout_s`."""
        for part in reversed(self.parts):
            started = time.monotonic()
            await self._stop(part, started + part.stop_timeout_s)
            log.debug("part stopped", part=part.name, took_s=round(time.monotonic() - started, 3))

    async def _stop(self, part: Part, deadline: float) -> None:
        try:
            await asyncio.wait_for(part.stop(), part.stop_timeout_s)
        except TimeoutError:
            log.error("part did not stop in time", part=part.name)
        except Exception:
            log.exception("part failed to stop", part=part.name)
        task = self._tasks.get(part.name)
        if task is None or task.done():
            return
        if part.ends_on_stop:
            try:
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(asyncio.shield(task), left)
                return
            except TimeoutError:
                log.error("part did not end in time", part=part.name)
        await _cancel(task, part.name)


async def _cancel(task: asyncio.Task[None], name: str) -> None:
    """Cancel `task` until it ends, and never wait for it without a bound.

    Python 3.11's `asyncio.wait_for` swallows a cancellation that comes as the future
    it waits on completes (python/cpython#86296, fixed in 3.12). A daemon sent SIGTERM
    right after READY=1 hit it in about one start in thirty: the health report's wait
    for the engine returned as the stop cancelled it, the part lived on, and the stop
    waited for it until the daemon was killed. A cancellation is therefore repeated,
    and a part that still does not end is logged and left behind.
    """
    for _attempt in range(CANCEL_TRIES):
        task.cancel()
        done, _pending = await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
        if done:
            return
    log.error("part did not end when cancelled", part=name)


class Loop(Part):
    """Sleeps until poked or its next round is due, then runs a round.

    A round that fails on the database or the network waits with backoff and
    runs again; any other error is a bug, and fails the part (see `Parts`).
    """

    stop_timeout_s = 2.0

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
