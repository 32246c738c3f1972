"""Webhook attempts made by a child process: the sender's `Poster`, across a socketpair.

`PosterProcess` has `Poster`'s shape (an async context manager with `post`), so the
sender and `dlq/replay` use it as they would the local one. It starts the poster
process (gateway/outbound/poster_child.py) when the daemon warms it (`warm`) or at
the first attempt, whichever comes first: a gateway without webhooks never has one.
Posts made in one turn of the loop cross in one frame, and their outcomes come back
the same way.

When the child dies, or stops answering (no outcome within a post's timeout and
ANSWER_GRACE_S: it is killed), every attempt it held ends as a failed attempt,
"the poster process stopped", which the sender retries on its schedule; the next
attempt starts a new child, after a pause that grows while children keep dying.
Delivery stays at least once, and receivers deduplicate by `webhook-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
from collections.abc import Callable
from types import TracebackType

import structlog

from gateway import spawn
from gateway.channel import Channel, ChannelClosed
from gateway.lifecycle import backoff
from gateway.outbound.poster_frames import Answers, Post, Posts, Withdraw
from gateway.outbound.webhook_http import WITHDRAWN, Attempt, signed_headers

log = structlog.get_logger("fieldgate.webhooks")

CHILD = "gateway.outbound.poster_child"
ANSWER_GRACE_S = 5.0
"""A post not answered within its timeout and this: the child is stuck, and killed."""
WATCH_EVERY_S = 1.0
RESTART_MAX_S = 30.0
STOP_WAIT_S = 5.0
STOPPED = "the poster process stopped"


class _Child:
    """One poster process and its channel, while it lives."""

    def __init__(self, started: spawn.Started, channel: Channel) -> None:
        self.process = started.process
        self.channel = channel
        self.reader: asyncio.Task[None] | None = None


class PosterProcess:
    """Posts through a child process it starts, watches and starts again.

    A lane hands it three times its `max_in_flight` (`depth`), and the child attempts
    at most `max_in_flight` of them at once: the next attempts wait there, ready as
    one ends, instead of a round trip through both processes behind each end (at
    eight in flight that round trip halved the pace, docs/benchmarks.md)."""

    depth = 3

    def __init__(
        self,
        log_level: str = "info",
        log_format: str = "auto",
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.log_level = log_level
        self.log_format = log_format
        self.on_restart = on_restart
        """Called at each death (the metrics count them)."""
        self._open = False
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._pending: dict[int, tuple[asyncio.Future[Attempt], float]] = {}
        """Each post not answered yet: its future and when the child must have answered."""
        self._unsent: list[Post] = []
        self._ids = itertools.count(1)
        self._failures = 0
        self._started_at = 0.0
        self._watch: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self.restarts = 0
        """Children that died or were killed (the first start is not one)."""

    async def __aenter__(self) -> PosterProcess:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        if self._watch is not None:
            self._watch.cancel()
        child, self._child = self._child, None
        if child is not None:
            await self._end(child)
        await asyncio.gather(*self._ending)
        self._fail_pending()

    async def warm(self) -> None:
        """Start the child now, not at the first attempt (its start, aiohttp's import
        included, took ~0.4 s, which the first crisis event would wait through)."""
        if self._open and self._child is None:
            await self._start()

    async def post(
        self,
        url: str,
        key: bytes,
        msg_id: str,
        body: bytes,
        timeout_s: float,
        *,
        lane: str = "",
        limit: int = 0,
    ) -> Attempt:
        """One attempt, made by the child when fewer than `limit` of `lane`'s are (see
        `Poster.post`)."""
        assert self._open, "PosterProcess used outside its `async with`"
        child = self._child or await self._start()
        if child is None:
            return Attempt(None, STOPPED, None, 0.0)
        loop = asyncio.get_running_loop()
        post_id = next(self._ids)
        future: asyncio.Future[Attempt] = loop.create_future()
        deadline = time.monotonic() + timeout_s * self.depth + ANSWER_GRACE_S
        self._pending[post_id] = (future, deadline)
        if not self._unsent:
            loop.call_soon(self._flush)
        headers = signed_headers(key, msg_id, body)
        self._unsent.append(Post(post_id, lane, limit, url, headers, body, timeout_s))
        return await future

    def withdraw(self, lane: str) -> None:
        """The lane's posts not sent yet end WITHDRAWN here, and the child answers so
        those that wait their turn there."""
        kept: list[Post] = []
        for post in self._unsent:
            if post.lane == lane:
                future, _deadline = self._pending.pop(post.id)
                if not future.done():
                    future.set_result(Attempt(None, WITHDRAWN, None, 0.0))
            else:
                kept.append(post)
        self._unsent = kept
        child = self._child
        if child is not None:
            with contextlib.suppress(ChannelClosed):  # the reader ends them all
                child.channel.send(Withdraw(lane))

    def _flush(self) -> None:
        posts, self._unsent = self._unsent, []
        child = self._child
        if child is None or not posts:
            return
        with contextlib.suppress(ChannelClosed):  # the reader ends them all
            child.channel.send(Posts(posts))

    # -- the child's life ------------------------------------------------------------

    async def _start(self) -> _Child | None:
        """A running child: this one, or a new one (after the pause the deaths before
        it earned); None when stopping meanwhile."""
        async with self._starting:
            if self._child is not None:
                return self._child
            if self._failures:
                await asyncio.sleep(backoff(self._failures, 0.2, RESTART_MAX_S))
            if not self._open:
                return None
            started = spawn.start(CHILD, self.log_level, self.log_format)
            channel = await Channel.open(started.channel, Answers)
            child = self._child = _Child(started, channel)
            self._started_at = time.monotonic()
            child.reader = asyncio.create_task(self._read(child), name="webhooks:poster")
            if self._watch is None:
                self._watch = asyncio.create_task(self._watching(), name="webhooks:poster-watch")
            log.debug("poster process started", pid=started.process.pid)
            return child

    async def _read(self, child: _Child) -> None:
        """Outcomes until the channel closes; then every post in hand ends failed."""
        pending = self._pending
        try:
            while True:
                frame = await child.channel.receive()
                for answer in frame.answers:
                    entry = pending.pop(answer.id, None)
                    if entry is not None and not entry[0].done():
                        entry[0].set_result(
                            Attempt(
                                answer.status, answer.error, answer.retry_after_s, answer.seconds
                            )
                        )
        except ChannelClosed:
            pass
        if self._child is child:
            self._child = None
            self._lost(child)

    def _lost(self, child: _Child) -> None:
        """The child is gone: fail what it held, reap it, count the death."""
        held = self._fail_pending()
        if not self._open:
            return
        lived_s = time.monotonic() - self._started_at
        self._failures = 1 if lived_s > 60 else self._failures + 1
        self.restarts += 1
        self.on_restart()
        code = child.process.poll()
        log.error(
            "poster process died: its attempts will be retried",
            how=_how(code),
            attempts=held,
            failures=self._failures,
        )
        task = asyncio.create_task(self._end(child))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _fail_pending(self) -> int:
        """End every post in hand as a failed attempt; how many there were."""
        failed = list(self._pending.values())
        self._pending.clear()
        self._unsent.clear()
        for future, _deadline in failed:
            if not future.done():
                future.set_result(Attempt(None, STOPPED, None, 0.0))
        return len(failed)

    async def _watching(self) -> None:
        """Kill a child that holds a post past its deadline (its reader then ends it)."""
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            child = self._child
            now = time.monotonic()
            if child is not None and any(deadline < now for _f, deadline in self._pending.values()):
                log.error("poster process stopped answering: killing it", pid=child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    async def _end(self, child: _Child) -> None:
        """Close its channel (it exits at the end of it), and reap it."""
        child.channel.close()
        if child.reader is not None and child.reader is not asyncio.current_task():
            child.reader.cancel()
        process = child.process
        try:
            await asyncio.to_thread(process.wait, STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.to_thread(process.wait)


def _how(code: int | None) -> str:
    """How a child ended, as the engine's death is told (gateway/mqtt/engine_process.py)."""
    if code is None:
        return "closed its channel, still running"
    return f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
