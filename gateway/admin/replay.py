"""The answers of recent admin writes, to give a redelivered request the same answer.

A request's `transaction` is an idempotency key (PROTOCOL.md, Conventions): the
same request delivered twice (an MQTT redelivery after a reconnect, a client
resending what it saw no PUBACK for) must act once, and its requester must not
be told something else the second time (`already_acknowledged`, or "not open"
for a resolution that was its own). A write command's answer is kept here for a
while, and a redelivery is answered with it instead of running again; one that
arrives while the first still runs waits for the first's answer.

Only writes are kept: a read has no effect to double, and asked again it answers
with the figures of now. The memory is bounded in count and in time, and is the
process's own: a redelivery after a restart of the gateway runs again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from handlers.errors import Error

Outcome = tuple[dict[str, Any] | None, Error | None]
"""A command's answer: its data, or its error."""

_encode = msgspec.json.Encoder().encode


class RecentAnswers:
    """The outcomes of the last `size` write requests, each kept for `keep_s` seconds."""

    def __init__(self, size: int = 1000, keep_s: float = 600.0) -> None:
        self.size = size
        self.keep_s = keep_s
        self._outcomes: OrderedDict[bytes, tuple[float, asyncio.Future[Outcome]]] = OrderedDict()

    @staticmethod
    def key(command: str, transaction: Any, args: dict[str, Any]) -> bytes | None:
        """The request's identity: its command, transaction and arguments, as sent. A
        request without a transaction has none (it cannot be told from another)."""
        if transaction is None:
            return None
        return _encode([command, transaction, args])

    async def once(self, key: bytes | None, run: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """`run()`'s outcome; for a key seen within `keep_s`, the first run's outcome."""
        if key is None:
            return await run()
        now = time.monotonic()
        self._forget(now)
        kept = self._outcomes.get(key)
        if kept is not None:
            return await asyncio.shield(kept[1])
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._outcomes[key] = (now + self.keep_s, future)
        try:
            outcome = await run()
        except BaseException:
            # Not answered (the daemon is stopping): a redelivery may run it again.
            del self._outcomes[key]
            future.cancel()
            raise
        future.set_result(outcome)
        return outcome

    def _forget(self, now: float) -> None:
        """Drop what has expired and, past `size`, the oldest."""
        while self._outcomes:
            key, (expires, future) = next(iter(self._outcomes.items()))
            if expires > now and len(self._outcomes) < self.size:
                return
            if not future.done():
                return
            del self._outcomes[key]
