"""A slow endpoint beside a fast one: the fast one's event-to-arrival time (issue 13:
its p99 stays under 0.5 s while the slow one holds every slot it has).

A real broker, Redis and daemon (SQLite); two receivers on loopback, both
subscribed to every event: `slow` answers after 5 s (its `max_in_flight` 2 are
always busy), `fast` at once. Panic alerts published over MQTT make one
`alert.crisis` event each. An event's time is its body's `timestamp` (when its
cause committed); its arrival is the fast receiver's wall clock (one machine, one
clock). The test suite holds the order-based claim (the fast endpoint has every
event before the slow one has answered once); the time is measured here.

    .venv/bin/python -m benchmarks.webhook_isolation [--events 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from aiohttp import web

from tests.support.alerts import alert
from tests.support.mqtt import Client
from tests.support.processes import Daemon, RedisServer, daemon_env
from tests.support.webhooks import Receiver, Reply, endpoint


class Timed(Receiver):
    """A receiver that also notes each request's wall-clock arrival."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.time())
        return await super()._handle(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--port", type=int, default=1883, help="the broker")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fg-isolation-"))
    redis = RedisServer(work / "redis").start()
    try:
        with Receiver(lambda _n: Reply(200, delay_s=5.0)) as slow, Timed() as fast:
            config = endpoint("slow", slow.url, max_in_flight=2, timeout_s=10)
            config += endpoint("fast", fast.url)
            env = daemon_env(work / "daemon", args.port, REDIS__URL=redis.url)
            daemon = Daemon(work / "daemon", env, config).start()
            client = Client(args.port).connect()
            try:
                for n in range(args.events):
                    body = alert(f"a{n}", user_id=f"u{n}", kind="panic")
                    client.publish(f"{daemon.root}/devices/dev1/alerts", body, wait=False)
                    time.sleep(0.01)
                requests = fast.wait(args.events, timeout=120)
                slow_answered = slow.answered
            finally:
                client.close()
                daemon.stop()
    finally:
        redis.stop()
    lags = sorted(
        arrival - datetime.fromisoformat(r.event["timestamp"].replace("Z", "+00:00")).timestamp()
        for r, arrival in zip(requests, fast.arrivals, strict=False)
    )

    def quantile(q: float) -> float:
        return float(lags[min(len(lags) - 1, int(q * len(lags)))] * 1000)

    print(
        f"fast endpoint, {len(lags)} events while the slow one answered {slow_answered}:"
        f" p50 {quantile(0.5):.1f} ms, p99 {quantile(0.99):.1f} ms, max {lags[-1] * 1000:.1f} ms"
        " (target p99 < 500 ms)"
    )


if __name__ == "__main__":
    main()
