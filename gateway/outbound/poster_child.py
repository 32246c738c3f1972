"""The poster process: webhook POSTs in a process, and an interpreter lock, of their own.

The sender (gateway/outbound/webhook_sender.py, in the MQTT process) claims, signs
nothing and settles; it hands each attempt here over a socketpair
(gateway/outbound/poster_process.py) and gets back what it came to. aiohttp's own
work per request was most of the sender's CPU (~110 of ~200 µs an event,
docs/benchmarks.md): here it runs beside the sender's database work and the MQTT
session instead of taking turns with them.

Nothing is kept here: a post is attempted as it arrives, and its outcome sent back.
When the channel closes (the MQTT process stopped, or died), the attempts in hand
are dropped and the process exits; the sender's leases bring those deliveries back.
It ignores SIGTERM and SIGINT, which systemd and a terminal send to the whole group:
the MQTT process decides when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections import deque

import structlog

from gateway import logs
from gateway.channel import Channel, ChannelClosed
from gateway.lifecycle import GC_YOUNG_MQTT, run_async, tune_gc
from gateway.outbound.poster_frames import Answers, Post, Posted, ToPoster, Withdraw
from gateway.outbound.webhook_http import WITHDRAWN, Poster

log = structlog.get_logger("fieldgate.webhooks")


class _Lane:
    """One lane's posts waiting for a place, and how many of its places are busy."""

    __slots__ = ("busy", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[Post] = deque()
        self.busy = 0


class Server:
    """Attempts the posts as they come, each lane at most `limit` at once; sends the
    outcomes back once per loop turn.

    A task per busy place, which takes the lane's next post as an attempt ends, not a
    task per post: the sender hands over more than `limit` (`PosterProcess.depth`), so
    that a place never waits for the round trip back to it."""

    def __init__(self, channel: Channel, poster: Poster) -> None:
        self.channel = channel
        self.poster = poster
        self.places: set[asyncio.Task[None]] = set()
        self.lanes: dict[str, _Lane] = {}
        self.answers: list[Posted] = []

    async def serve(self) -> None:
        """Until the channel closes (ChannelClosed)."""
        try:
            while True:
                frame = await self.channel.receive()
                if isinstance(frame, Withdraw):
                    self._withdraw(frame.lane)
                    continue
                for post in frame.posts:
                    lane = self.lanes.get(post.lane)
                    if lane is None:
                        lane = self.lanes[post.lane] = _Lane()
                    lane.waiting.append(post)
                    if post.limit <= 0 or lane.busy < post.limit:
                        lane.busy += 1
                        task = asyncio.create_task(self._place(lane))
                        self.places.add(task)
                        task.add_done_callback(self.places.discard)
        finally:
            for task in self.places:
                task.cancel()

    async def _place(self, lane: _Lane) -> None:
        """Attempt the lane's waiting posts one after the other, while there are any
        and the lane's (possibly reloaded) limit leaves this place open."""
        try:
            while lane.waiting:
                post = lane.waiting.popleft()
                attempt = await self.poster.send(post.url, post.headers, post.body, post.timeout_s)
                self._answer(
                    [
                        Posted(
                            post.id,
                            attempt.status,
                            attempt.error,
                            attempt.retry_after_s,
                            attempt.seconds,
                        )
                    ]
                )
                if 0 < post.limit < lane.busy:
                    return
        finally:
            lane.busy -= 1

    def _withdraw(self, name: str) -> None:
        lane = self.lanes.get(name)
        if lane is None or not lane.waiting:
            return
        self._answer([Posted(post.id, None, WITHDRAWN, None, 0.0) for post in lane.waiting])
        lane.waiting.clear()

    def _answer(self, answers: list[Posted]) -> None:
        """Queue outcomes; the first of a loop turn's schedules their one frame."""
        if not self.answers:
            asyncio.get_running_loop().call_soon(self._flush)
        self.answers.extend(answers)

    def _flush(self) -> None:
        answers, self.answers = self.answers, []
        with contextlib.suppress(ChannelClosed):  # gone: `serve` ends at its next read
            self.channel.send(Answers(answers))


async def serve(fd: int) -> int:
    channel = await Channel.open(socket.socket(fileno=fd), ToPoster)
    tune_gc(GC_YOUNG_MQTT)
    async with Poster() as poster:
        try:
            await Server(channel, poster).serve()
        except ChannelClosed:
            log.debug("the sender closed the channel: exiting")
    return 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    fd, level, fmt = int(args[0]), args[1], args[2]
    logs.setup(
        level,
        "json" if fmt == "json" else "console" if fmt == "console" else "auto",
        process="poster",
    )
    sys.exit(run_async(serve(fd)))


if __name__ == "__main__":
    main()
