"""The engine as the MQTT process has it: a child process behind the channel.

`EngineProcess` starts the engine process (gateway/ingest/process.py), hands it
deliveries and hands back its results: it is the seam's `Engine` for the
intake. It keeps every delivery until the engine reports it committed, so
that nothing is acknowledged before its commit and nothing taken is lost when
the engine dies: the engine is started again, with a pause that grows, and
given every delivery still held, in the order taken (what it had committed
before dying is then a duplicate, answered as such and stored once). While it
is down the daemon is unhealthy and the watchdog is not fed; what arrives
meanwhile waits for the next engine.

The channel is bounded: past `engine.max_channel_bytes` of held payloads (or
`writer.max_in_process` messages, which the intake counts) the MQTT side stops
reading the socket, as it does for a slow commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import threading
import time
from collections.abc import Callable

import structlog

from gateway import spawn
from gateway.channel import (
    Channel,
    ChannelClosed,
    Drain,
    Drained,
    FromEngine,
    Ping,
    Pong,
    Reload,
    Results,
    Start,
    Submit,
)
from gateway.config import Settings, portable
from gateway.lifecycle import Part, backoff
from gateway.metrics import Metrics
from gateway.seam import Delivery, EngineState, Reply, Result
from handlers.errors import Code, Error

log = structlog.get_logger("fieldgate.engine")

ANSWER_TIMEOUT_S = 5.0
"""How long a ping may wait for the engine's answer."""
RELOAD_TIMEOUT_S = 30.0
"""How long a reload may: it loads the active model when one was activated (a forest
takes a second on an idle machine, more than ANSWER_TIMEOUT_S on a loaded one, and
`ml/activate` promises the engine scores with it once it answers)."""
STOP_WAIT_S = 5.0
"""How long the engine process may take to exit after its drain, before it is killed."""
SUBMIT_BYTES = 8 << 20
"""Payload bytes in one `Submit` frame, at most (a single larger delivery goes alone)."""


class EngineProcess(Part):
    """Starts, feeds, watches and restarts the engine process."""

    name = "engine"
    ends_on_stop = True
    stop_timeout_s = 20.0

    def __init__(self, settings: Callable[[], Settings], metrics: Metrics, beat_s: float) -> None:
        self.settings = settings
        self.metrics = metrics
        self.beat_s = beat_s
        self.state = EngineState()
        """What the engine said of itself at its last answer."""
        self.down: str | None = "starting"
        """Why the engine does not serve now; None while it does."""
        self.serving = asyncio.Event()
        """Set once an engine process answered (the daemon is ready then)."""
        self.last_answer = time.monotonic()
        self._held: dict[int, Delivery] = {}
        """Every delivery taken and not yet reported committed, in the order taken."""
        self._held_bytes = 0
        self._held_bytes_max = 0
        metrics.engine_held_bytes.set_function(lambda: self._held_bytes)
        metrics.engine_held_bytes_max.set_function(lambda: self._held_bytes_max)
        self._unsent: list[Delivery] = []
        self._flush_soon = False
        self._channel: Channel | None = None
        self._answers: dict[int, asyncio.Future[None]] = {}
        self._seq = itertools.count(1)
        self._closing = asyncio.Event()
        self._callback: Callable[[Result], None] = lambda _result: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    # -- the seam ------------------------------------------------------------------

    def on_result(self, callback: Callable[[Result], None]) -> None:
        self._callback = callback

    def submit(self, delivery: Delivery) -> None:
        if delivery.reply and (self._closing.is_set() or self.down is not None):
            why = "the gateway is stopping" if self._closing.is_set() else "the engine is down"
            self._refuse(delivery, f"{why}: nothing was written; retry later")
            return
        self._held[delivery.receive_id] = delivery
        self._held_bytes += len(delivery.payload)
        self._held_bytes_max = max(self._held_bytes_max, self._held_bytes)
        self._unsent.append(delivery)
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    @property
    def busy(self) -> bool:
        return self._held_bytes >= self.settings().engine.max_channel_bytes

    def _refuse(self, delivery: Delivery, why: str) -> None:
        """Answer an admin write `unavailable` without the engine."""
        reply = Reply(error=Error(Code.UNAVAILABLE, why).as_dict())
        self._callback(Result(done=[delivery.receive_id], replies={delivery.receive_id: reply}))

    def _flush(self) -> None:
        """Everything submitted since the last flush: one frame, or a few when it is much
        (the resubmission after a restart), each under SUBMIT_BYTES."""
        self._flush_soon = False
        if self._channel is None or not self._unsent:
            return
        frame: list[Delivery] = []
        size = 0
        with contextlib.suppress(ChannelClosed):  # the engine died: it is given them again
            for delivery in self._unsent:
                if frame and size + len(delivery.payload) > SUBMIT_BYTES:
                    self._channel.send(Submit(frame))
                    frame, size = [], 0
                frame.append(delivery)
                size += len(delivery.payload)
            self._channel.send(Submit(frame))
        self._unsent = []

    # -- state, for health, stats, the watchdog and the metrics endpoint --------------

    def alive(self, wedged_after_s: float) -> bool:
        """It serves, answered lately, and its writer is not wedged."""
        if self.down is not None:
            return False
        silent_s = time.monotonic() - self.last_answer
        return silent_s < wedged_after_s and self.stuck_s() < wedged_after_s

    def stuck_s(self) -> float:
        """How long its writer has made no progress, as of its last answer."""
        return self.state.stuck_s + (time.monotonic() - self.last_answer)

    async def refresh(self) -> None:
        """Ask the engine for its state and metrics now (best effort)."""
        with contextlib.suppress(TimeoutError, ChannelClosed):
            await self._ask(Ping(next(self._seq)))

    def _refresh_from_thread(self) -> None:
        """For the metrics endpoint's thread: the engine's latest figures on a scrape
        (what it last said, when it does not answer in time)."""
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() == self._loop_thread:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.refresh(), loop).result(ANSWER_TIMEOUT_S)

    async def reload(self, settings: Settings) -> None:
        """Apply new settings in the engine; returns once it has (or it is down)."""
        with contextlib.suppress(TimeoutError, ChannelClosed):
            await self._ask(Reload(next(self._seq), portable(settings)), RELOAD_TIMEOUT_S)

    async def _ask(self, frame: Ping | Reload, timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        if self._channel is None:
            raise ChannelClosed
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._answers[frame.seq] = answer
        try:
            self._channel.send(frame)
            await asyncio.wait_for(answer, timeout_s)
        finally:
            self._answers.pop(frame.seq, None)

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.metrics.relay.refresh = self._refresh_from_thread
        failures = 0
        while not self._closing.is_set():
            started = time.monotonic()
            ended = await self._serve()
            if self._closing.is_set():
                return
            failures = 1 if time.monotonic() - started > 60 else failures + 1
            delay = backoff(failures, 0.5, self.settings().engine.restart_max_s)
            self.down = f"restarting: the engine process {ended}"
            self.metrics.engine_restarts.inc()
            log.error(
                "engine process died",
                how=ended,
                held=len(self._held),
                restart_in_s=delay,
                failures=failures,
            )
            self._abandon_writes()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    def _abandon_writes(self) -> None:
        """The admin writes a dead engine held: it may have committed them, or not.
        Say so, rather than submit them again (a resolution submitted twice would
        answer "resolved already" for a write that succeeded)."""
        for receive_id, delivery in list(self._held.items()):
            if delivery.reply:
                del self._held[receive_id]
                self._held_bytes -= len(delivery.payload)
                self._refuse(
                    delivery,
                    "the engine process died during this write: it may have been committed;"
                    " look before you retry",
                )

    async def _serve(self) -> str:
        """Start one engine process and serve it until it exits; how it ended. However
        this ends (a stop's timeout cancels it), the process does not outlive it."""
        process, ours = spawn.take()
        try:
            channel = await Channel.open(ours, FromEngine)
            try:
                await self._serve_channel(channel)
            except ChannelClosed:
                pass
            except Exception:
                log.exception("engine channel failed: starting another engine")
            finally:
                self._channel = None
                channel.close()
                for answer in self._answers.values():
                    if not answer.done():
                        answer.set_exception(ChannelClosed())
            return await self._ended(process)
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.to_thread(process.wait)

    async def _serve_channel(self, channel: Channel) -> None:
        channel.send(Start(portable(self.settings())))
        # everything held goes (again), in the order it was taken
        self._unsent = list(self._held.values())
        self._channel = channel
        self._flush()
        if self._closing.is_set():  # the stop came while this engine was starting
            channel.send(Drain())
        pings = asyncio.create_task(self._ping(channel), name="engine:ping")
        try:
            await self._read(channel)
        finally:
            pings.cancel()

    async def _read(self, channel: Channel) -> None:
        """Frames from the engine until `Drained` (or ChannelClosed)."""
        while True:
            frame = await channel.receive()
            if isinstance(frame, Results):
                result = frame.result
                for receive_id in result.done:
                    delivery = self._held.pop(receive_id, None)
                    if delivery is not None:
                        self._held_bytes -= len(delivery.payload)
                try:
                    self._callback(result)
                except Exception:
                    # a bug on the MQTT side: the engine and its commits are fine
                    log.exception("a commit's result could not be handled")
            elif isinstance(frame, Pong):
                self.state = frame.state
                self.last_answer = time.monotonic()
                self.metrics.relay.update(frame.metrics)
                if self.down is not None:
                    log.info("engine process serving", pid=frame.state.pid, held=len(self._held))
                    self.down = None
                    self.serving.set()
                answer = self._answers.get(frame.seq)
                if answer is not None and not answer.done():
                    answer.set_result(None)
            elif isinstance(frame, Drained):
                return

    async def _ping(self, channel: Channel) -> None:
        while True:
            with contextlib.suppress(ChannelClosed):
                channel.send(Ping(next(self._seq)))
            await asyncio.sleep(self.beat_s)

    async def _ended(self, process: subprocess.Popen[bytes]) -> str:
        try:
            code = await asyncio.to_thread(process.wait, STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("engine process did not exit: killing it", pid=process.pid)
            process.kill()
            code = await asyncio.to_thread(process.wait)
        return f"was killed by signal {-code}" if code < 0 else f"exited with {code}"

    async def stop(self) -> None:
        """Drain: the engine commits and answers what it holds, then exits."""
        self._closing.set()
        channel = self._channel
        if channel is None:
            return
        self._flush()
        with contextlib.suppress(ChannelClosed):
            channel.send(Drain())
