"""A real webhook receiver: an aiohttp server on a loopback port, in a thread of its own.

Tests drive the daemon (a process) and read what the receiver got; the receiver
answers as the test says (`respond`), checks every signature with the reference
library and by hand, and keeps every request in arrival order.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.support.processes import wait_for

SECRET = "whsec_" + base64.b64encode(b"fieldgate-test-signing-key-0123").decode()


@dataclass(frozen=True)
class Reply:
    """What the receiver answers: a status, after a delay, with headers."""

    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    msg_id: str
    timestamp: str
    body: bytes
    at: float
    """time.monotonic() at arrival."""
    verified: bool
    """The reference library and the hand-written check both accept the signature."""

    @property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded


def hand_check(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The spec's steps: the key after `whsec_`, HMAC-SHA256 of `id.timestamp.body`,
    compared in constant time with each `v1,` signature of the header."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        version == "v1" and hmac.compare_digest(value, expected)
        for version, _, value in (s.partition(",") for s in headers["webhook-signature"].split())
    )


def library_check(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


class Receiver:
    """`with Receiver(respond) as r:` ... `r.url`, `r.requests`, `r.wait(n)`."""

    def __init__(self, respond: Callable[[int], Reply] | None = None, secret: str = SECRET) -> None:
        self.respond = respond or (lambda _n: Reply())
        self.secret = secret
        self.requests: list[Request] = []
        self.answered = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=query-secret"

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = library_check(self.secret, headers, body) and hand_check(
            self.secret, headers, body
        )
        with self._lock:
            n = len(self.requests)
            self.requests.append(
                Request(
                    headers.get("webhook-id", ""),
                    headers.get("webhook-timestamp", ""),
                    body,
                    time.monotonic(),
                    verified,
                )
            )
        reply = self.respond(n)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        with self._lock:
            self.answered += 1
        return web.Response(status=reply.status, headers=reply.headers)

    def wait(self, count: int, timeout: float = 20.0) -> list[Request]:
        """The first `count` requests, once they arrived."""
        wait_for(lambda: len(self.requests) >= count, timeout)
        with self._lock:
            return list(self.requests[:count])

    def distinct(self) -> dict[str, Request]:
        """The requests by `webhook-id`, as a deduplicating receiver keeps them."""
        with self._lock:
            return {r.msg_id: r for r in self.requests}


def endpoint(name: str, url: str, *, secret: str = SECRET, **keys: Any) -> str:
    """A `[[webhooks]]` table of the config file."""
    lines = ["[[webhooks]]", f'name = "{name}"', f'url = "{url}"', f'secret = "{secret}"']
    keys.setdefault("events", ["*"])
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
