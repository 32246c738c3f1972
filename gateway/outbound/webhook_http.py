"""One attempt to deliver a webhook: a signed POST on the one pooled aiohttp session.

The sender and `dlq/replay` both attempt through here, so that a replayed entry is
sent, signed and judged exactly as the first attempts were. An attempt never
raises for what the network or the receiver did: it returns what happened, in a
form that goes into a log, an answer or a dead-letter entry as it is (one line, no
URL: an endpoint's URL may carry a token in its query).
"""

from __future__ import annotations

import asyncio
import os
import time
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from gateway import __version__
from handlers import webhooks

if TYPE_CHECKING:
    import aiohttp

BODY_READ_LIMIT = 64 * 1024
"""What is read of a receiver's answer (then the connection goes back to the pool);
the body itself is never used."""


class Attempt:
    """What one POST came to."""

    __slots__ = ("error", "retry_after_s", "seconds", "status")

    def __init__(
        self, status: int | None, error: str | None, retry_after_s: float | None, seconds: float
    ) -> None:
        self.status = status
        self.error = error
        """The transport's failure (a timeout, a refused connection), else None."""
        self.retry_after_s = retry_after_s
        self.seconds = seconds

    @property
    def outcome(self) -> webhooks.Outcome:
        return webhooks.classify(self.status, self.error)

    def describe(self) -> str | None:
        """`last_error`: the transport's failure, or the status a failure answered."""
        if self.error is not None:
            return self.error
        if self.outcome == "success":
            return None
        return f"HTTP {self.status}"


WITHDRAWN = "withdrawn before its attempt"
"""The error of an attempt that was never made: its lane took it back (`withdraw`)."""


class Posting(Protocol):
    """What makes attempts: `Poster` here, or `PosterProcess` through a child process
    (gateway/outbound/poster_process.py)."""

    depth: int
    """Attempts a lane hands over per place of its `max_in_flight`: more than one when
    the poster holds the next attempts itself, ready to start as one ends."""

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
    ) -> Attempt: ...

    def withdraw(self, lane: str) -> None:
        """The lane's posts not yet attempted end as WITHDRAWN (a disabled, paused or
        removed endpoint gets no more); those under way go on."""


class Poster:
    """An async context manager for the session, made at the first attempt; `post`
    makes one attempt.

    aiohttp is imported then, not with the daemon: its 0.13-0.2 s of import were a
    sixth of the daemon's start, which a crisis queued behind a backlog waits through
    (benchmarks/backlog_priority.py), and a gateway without webhooks never needs it.
    """

    depth = 1

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._open = False
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def withdraw(self, lane: str) -> None:
        """Nothing waits here: each attempt is made as it is asked for."""

    async def __aenter__(self) -> Poster:
        self._open = True
        return self

    def _client(self) -> aiohttp.ClientSession:
        assert self._open, "Poster used outside its `async with`"
        if self._session is None:
            import aiohttp  # here, not at the top: see the class's docstring

            # No limit on the pool: each endpoint bounds its own concurrency
            # (`max_in_flight`), and a shared bound would let one endpoint starve another.
            # No cookies: a receiver's cookie is not sent back, to it or to another
            # endpoint on the same host.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={
                    "user-agent": f"fieldgate/{__version__}",
                    "content-type": "application/json",
                },
                skip_auto_headers=("accept-encoding",),
            )
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        """POST `body` signed for `msg_id` now. `lane` and `limit` are the caller's to
        keep here: it bounds its own attempts."""
        return await self.send(url, signed_headers(key, msg_id, body), body, timeout_s)

    async def send(
        self, url: str, headers: dict[str, str], body: bytes, timeout_s: float
    ) -> Attempt:
        """POST `body` with its signed `headers`; redirects are not followed (a 3xx is a
        final answer, PROTOCOL.md)."""
        import aiohttp  # for its exceptions; `_client` imported it

        session = self._client()
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s)
        started = time.perf_counter()
        status: int | None = None
        try:
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as response:
                status = response.status
                retry_after = response.headers.get("retry-after")
                await response.content.read(BODY_READ_LIMIT)
        except TimeoutError:
            return Attempt(status, f"no answer within {timeout_s:g} s", None, _since(started))
        except aiohttp.ClientConnectorError as exc:
            errno = exc.os_error.errno
            reason = os.strerror(errno) if errno else type(exc.os_error).__name__
            return Attempt(None, f"cannot connect: {reason}", None, _since(started))
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            return Attempt(
                status, f"connection failed: {type(exc).__name__}", None, _since(started)
            )
        wait = webhooks.parse_retry_after(retry_after, time.time())
        return Attempt(status, None, wait, _since(started))


def signed_headers(key: bytes, msg_id: str, body: bytes) -> dict[str, str]:
    """A request's headers, signed now (Standard Webhooks' timestamp is the signing's)."""
    stamp = int(time.time())
    return webhooks.headers(msg_id, stamp, webhooks.sign(key, msg_id, stamp, body))


def _since(started: float) -> float:
    return time.perf_counter() - started
