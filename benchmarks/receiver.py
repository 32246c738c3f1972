"""A fast webhook receiver for the benchmarks: answers 200 at once and counts.

    .venv/bin/python -m benchmarks.receiver [--port 0] [--verify-secret whsec_...]

Run as a process of its own (the benchmarks start it; it can be run by hand), an
aiohttp web server on 127.0.0.1 (on uvloop when it is installed, as the daemon
is), with its access log off. Every POST (any path) is read in full, counted, its
`webhook-id` added to a set, and answered `200` with an empty body: nothing is
done that a sender would wait for. With `--verify-secret`, each signature is also
checked by hand (the Standard Webhooks steps: HMAC-SHA256 of `id.timestamp.body`
with the key after `whsec_`) and failures counted; off by default, since it costs
the receiver CPU that the sender under test shares the machine with.

When it listens it prints one line on stdout, `listening <port>`, and then
nothing. The control, over HTTP on the same port:

- `GET /count`: `{"requests", "distinct", "unverified", "bytes", "first_at",
  "last_at", "distinct_at"}`: requests and distinct webhook-ids since the last
  reset; the wall clock (`time.time()`) of the first request, the last one, and of
  the request that brought `distinct` to its value;
- `GET /wait?n=N&timeout=S`: answers as `/count` once `distinct` reaches N (or
  after S seconds, with what there is), so that a benchmark knows when all N
  arrived without polling;
- `POST /reset`: forget everything counted (between runs of one receiver).

`distinct_at` is when the N-th distinct event arrived, as measured here: the end
of a delivery run, the same for any sender.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web


class Counter:
    def __init__(self, secret: str | None) -> None:
        self.key = base64.b64decode(secret.removeprefix("whsec_")) if secret else None
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.unverified = 0
        self.ids: set[str] = set()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.distinct_at: float | None = None
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "distinct": len(self.ids),
            "unverified": self.unverified,
            "bytes": self.bytes,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "distinct_at": self.distinct_at,
        }

    def verified(self, headers: Any, body: bytes) -> bool:
        assert self.key is not None
        signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
        digest = hmac.new(self.key, signed, hashlib.sha256).digest()
        expected = base64.b64encode(digest).decode()
        return any(
            version == "v1" and hmac.compare_digest(value, expected)
            for version, _, value in (
                s.partition(",") for s in headers.get("webhook-signature", "").split()
            )
        )

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.requests += 1
        self.bytes += len(body)
        if self.key is not None and not self.verified(request.headers, body):
            self.unverified += 1
        msg_id = request.headers.get("webhook-id", "")
        if msg_id not in self.ids:
            self.ids.add(msg_id)
            self.distinct_at = now
            if self.waiters:
                self._wake()
        return web.Response(status=200)

    def _wake(self) -> None:
        count = len(self.ids)
        keep = []
        for n, future in self.waiters:
            if count >= n:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((n, future))
        self.waiters = keep

    async def count(self, _request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def wait(self, request: web.Request) -> web.Response:
        n = int(request.query.get("n", "0"))
        timeout = float(request.query.get("timeout", "60"))
        if len(self.ids) < n:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append((n, future))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
        return web.json_response(self.snapshot())

    async def do_reset(self, _request: web.Request) -> web.Response:
        for _, future in self.waiters:
            if not future.done():
                future.set_result(None)
        self.reset()
        return web.json_response(self.snapshot())


async def serve(port: int, secret: str | None) -> None:
    counter = Counter(secret)
    app = web.Application(client_max_size=16 * 2**20)
    app.router.add_get("/count", counter.count)
    app.router.add_get("/wait", counter.wait)
    app.router.add_post("/reset", counter.do_reset)
    app.router.add_post("/{path:.*}", counter.hook)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    server = site._server
    sockets = server.sockets if server is not None else []  # type: ignore[attr-defined]
    print(f"listening {sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class ReceiverProcess:
    """The receiver as a child process of a benchmark: `with ReceiverProcess() as r:`
    `r.url`, `r.reset()`, `r.wait(n, timeout)`, `r.count()`, `r.pid`."""

    def __init__(self, verify_secret: str | None = None, log: Path | None = None) -> None:
        self.verify_secret = verify_secret
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._stderr: Any = None

    def __enter__(self) -> ReceiverProcess:
        cmd = [sys.executable, "-m", "benchmarks.receiver"]
        if self.verify_secret:
            cmd += ["--verify-secret", self.verify_secret]
        self._stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening "):
            self.proc.kill()
            raise RuntimeError(f"the receiver did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log and self._stderr is not None:
            self._stderr.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Where to post (the path is not looked at)."""
        return f"{self.base}/hook"

    def _call(self, path: str, method: str = "GET", timeout: float = 10.0) -> dict[str, Any]:
        request = urllib.request.Request(self.base + path, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def count(self) -> dict[str, Any]:
        return self._call("/count")

    def reset(self) -> dict[str, Any]:
        return self._call("/reset", "POST")

    def wait(self, n: int, timeout: float) -> dict[str, Any]:
        """The counts once `n` distinct webhook-ids arrived, or after `timeout` s."""
        return self._call(f"/wait?n={n}&timeout={timeout}", timeout=timeout + 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.receiver", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="[default: a free one]")
    parser.add_argument(
        "--verify-secret", default=None, help="check every signature with this whsec_ secret"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port, args.verify_secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
