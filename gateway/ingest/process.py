"""The engine process: the work on payloads, in a process of its own.

The MQTT process starts it (gateway/mqtt/engine_process.py) with one end of a
socketpair and owns it: it sends the settings, then deliveries, pings, reloads
and at a stop a drain (gateway/channel.py); this process answers with the
results of its commits, its state and metrics, and `Drained`. The interpreter
lock here is the engine's alone: decoding, storing and detecting no longer
take turns with reading the socket (docs/decisions/0010-engine-process.md).

It ignores SIGTERM and SIGINT, which systemd and a terminal send to the whole
group: the MQTT process decides when it stops, after its drain. When the
channel closes without a drain, the MQTT process is gone; nothing this process
commits could be acknowledged any more, so it exits at once, and the broker
redelivers what was not acknowledged, which is then stored once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys

import structlog

from gateway import logs
from gateway.channel import (
    Channel,
    ChannelClosed,
    Drain,
    Drained,
    Ping,
    Pong,
    Reload,
    Results,
    Start,
    Submit,
    ToEngine,
)
from gateway.config import Settings
from gateway.ingest.assembly import EngineSide
from gateway.lifecycle import GC_YOUNG_ENGINE, run_async, tune_gc
from gateway.seam import Result

log = structlog.get_logger("fieldgate.engine")


class Server:
    """Serves the channel: frames in, the engine's results and answers out."""

    def __init__(self, channel: Channel, side: EngineSide) -> None:
        self.channel = channel
        self.side = side
        side.engine.on_result(self._result)

    def _result(self, result: Result) -> None:
        try:
            self.channel.send(Results(result))
        except ChannelClosed:
            log.warning("a commit's result has nowhere to go: the MQTT process is gone")

    def _pong(self, seq: int) -> None:
        self.channel.send(Pong(seq, self.side.state(), self.side.metrics.exposition()))

    async def serve(self) -> None:
        """Until drained (return) or the channel closes (ChannelClosed)."""
        engine = self.side.engine
        running = asyncio.create_task(engine.run(), name="engine")
        running.add_done_callback(_exit_if_failed)
        while True:
            frame = await self.channel.receive()
            if isinstance(frame, Submit):
                for delivery in frame.deliveries:
                    engine.submit(delivery)
            elif isinstance(frame, Ping):
                self._pong(frame.seq)
            elif isinstance(frame, Reload):
                settings = Settings.model_validate(frame.settings)
                self.side.apply(settings)
                logs.set_level(settings.log.level)
                # A reload is also how the MQTT process says a model was activated:
                # its answer waits until the model scores.
                await self.side.scorer.preload(self.side.database)
                self._pong(frame.seq)
            elif isinstance(frame, Drain):
                await self._drain(running)
                self.channel.send(Drained())
                await self.channel.writer.drain()
                return

    async def _drain(self, running: asyncio.Task[None]) -> None:
        """Commit what is in hand, still reading the channel: a drain can outlast the
        MQTT process (a commit retried while the database is away, until its stop
        times out and it is killed). Then the channel closes, and this process must
        not live on, an orphan retrying for nobody (ChannelClosed, as in `serve`)."""

        async def finish() -> None:
            await self.side.engine.drain()
            await running

        finished = asyncio.ensure_future(finish())
        while not finished.done():
            frame = asyncio.ensure_future(self.channel.receive())
            await asyncio.wait({finished, frame}, return_when=asyncio.FIRST_COMPLETED)
            if not frame.done():
                frame.cancel()
                break
            received = frame.result()  # raises ChannelClosed: the MQTT process is gone
            if isinstance(received, Ping):
                self._pong(received.seq)
        await finished


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    """The commit loop, or the model's load at the start, failed (a bug): exit, and the
    MQTT process starts another engine, which is given again everything not committed
    (rather than going on without the scoring an active model asks for)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the engine failed", exc_info=task.exception())
        os._exit(1)


async def serve(fd: int) -> int:
    channel = await Channel.open(socket.socket(fileno=fd), ToEngine)
    try:
        start = await channel.receive()
    except ChannelClosed:
        # Started early (gateway/spawn.py), and the MQTT process ended before it sent
        # the settings (a config it refused, `run --help`): nothing was done here.
        return 0
    if not isinstance(start, Start):
        return 2
    settings = Settings.model_validate(start.settings)
    logs.setup(settings.log.level, settings.log.format, process="engine")
    side = EngineSide(settings)
    # The active model loads while alerts and admin writes are served; sync work
    # waits for it, to be scored. Its served form takes milliseconds; a model without
    # one (older, or restored without it) a second or more: scikit-learn's import.
    side.engine.ready.clear()
    loading = asyncio.create_task(_load_model(side))
    loading.add_done_callback(_exit_if_failed)
    tune_gc(GC_YOUNG_ENGINE)
    log.debug("engine started", pid=os.getpid())
    try:
        await Server(channel, side).serve()
    except ChannelClosed:
        # Not a drain: the MQTT process died. Leave now, in the middle of whatever
        # runs: an open transaction is rolled back, and nothing was acknowledged.
        log.error("the MQTT process is gone: exiting without finishing what is in hand")
        os._exit(1)
    await loading
    await side.close()
    return 0


async def _load_model(side: EngineSide) -> None:
    try:
        await side.scorer.preload(side.database)
    finally:
        # The model (and scikit-learn's modules, if it needed them) join what start-up
        # froze out of the collector's scans (tune_gc): else each full collection
        # walks them.
        gc.freeze()
        side.engine.ready.set()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(run_async(serve(int(args[0]))))


if __name__ == "__main__":
    main()
