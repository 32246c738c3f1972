"""The lifecycle on its own: parts restarted and reported, a critical failure, the
stop order and its time bounds, and a background loop that does not spin.

In process, in well under a second each: the parts here are small classes that
record what happened to them (no broker, no database needed for what is tested).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway import lifecycle
from gateway.lifecycle import Loop, Part, Parts


class Recorder(Part):
    """Records its stop in a shared log; `fail` times raises from `run` first."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        fail: int = 0,
        stop_s: float = 0.0,
        critical: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self.fail = fail
        self.stop_s = stop_s
        self.critical = critical
        self.runs = 0
        self.running = asyncio.Event()
        """Set by the first run that does not fail."""

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.fail:
            raise ValueError("broken")
        self.running.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        await asyncio.sleep(self.stop_s)


@pytest.fixture(autouse=True)
def quick_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "backoff", lambda failures, *_: 0.01)


async def test_a_failing_part_is_restarted_and_makes_health_say_so() -> None:
    log: list[str] = []
    flaky = Recorder("flaky", log, fail=3)
    parts = Parts([Recorder("steady", log), flaky])
    parts.start()
    # Each failure logs its traceback, which takes a while on a loaded machine.
    await asyncio.wait_for(flaky.running.wait(), 10)
    await asyncio.sleep(0.05)
    assert flaky.runs == 4
    trouble = parts.trouble()
    assert list(trouble) == ["flaky"]
    assert (trouble["flaky"]["failures"], trouble["flaky"]["error"]) == (3, "ValueError")
    assert not parts.failed.is_set()
    await parts.stop()
    assert log == ["stop flaky", "stop steady"]


async def test_a_critical_part_that_fails_stops_the_daemon() -> None:
    parts = Parts([Recorder("engine", [], fail=1, critical=True)])
    parts.start()
    await asyncio.wait_for(parts.failed.wait(), 1)
    assert parts.trouble() == {}
    await parts.stop()


async def test_stop_bounds_each_part_by_its_own_timeout() -> None:
    log: list[str] = []
    slow = Recorder("slow", log, stop_s=10)
    slow.stop_timeout_s = 0.2
    parts = Parts([Recorder("first", log), slow])
    parts.start()
    started = time.monotonic()
    await parts.stop()
    assert log == ["stop slow", "stop first"]
    assert time.monotonic() - started < 2


def test_part_names_are_unique() -> None:
    with pytest.raises(AssertionError, match="repeat"):
        Parts([Recorder("a", []), Recorder("a", [])])


class Failing(Loop):
    """A round that always fails to publish, and pokes itself as a commit might."""

    name = "failing"

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    async def round(self) -> float:
        self.rounds += 1
        return 0.2


async def test_a_loop_waits_between_rounds_unless_poked() -> None:
    loop = Failing()
    task = asyncio.create_task(loop.run())
    await asyncio.sleep(0.5)
    assert loop.rounds in (3, 4)
    loop.poke()
    await asyncio.sleep(0.05)
    assert loop.rounds in (4, 5)
    task.cancel()


class Swallower(Part):
    """A part whose run swallows the first `swallow` cancellations (as a 3.11
    `asyncio.wait_for` does when its future completes as the cancellation comes)."""

    def __init__(self, name: str, swallow: int) -> None:
        self.name = name
        self.swallow = swallow
        self.swallowed = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if self.swallowed == self.swallow:
                    raise
                self.swallowed += 1


async def test_a_part_that_swallows_its_cancellation_does_not_hang_the_stop() -> None:
    """Cancelled again, it ends; one that swallows every cancellation is left behind
    after CANCEL_TRIES, and the stop ends all the same. Checked against: one cancel and
    an unbounded wait (the stop of a daemon sent SIGTERM right after READY=1 hung)."""
    once = Swallower("once", swallow=1)
    always = Swallower("always", swallow=1_000)
    parts = Parts([once, always])
    parts.start()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await asyncio.wait_for(parts.stop(), 10)
    assert time.monotonic() - started < lifecycle.CANCEL_TRIES * lifecycle.CANCEL_WAIT_S + 1
    assert (once.swallowed, always.swallowed) == (1, lifecycle.CANCEL_TRIES)
    assert parts._tasks["once"].cancelled()
    assert not parts._tasks["always"].done()
    always.swallow = always.swallowed  # the next cancellation ends it, for the test's end
    parts._tasks["always"].cancel()
    await asyncio.wait({parts._tasks["always"]}, timeout=1)
