"""Receipt-to-publication time of crisis alerts under a background sync load.

A real broker and a real daemon (SQLite, the default config); a few simulated
devices publish sync operations at a steady total rate (default 1,000 a second,
QoS 1, one operation per message); meanwhile one device sends crisis alerts,
spaced out. A subscriber on `<root>/alerts/crisis` timestamps each arrival; the
latency of an alert is its arrival time minus the moment its device handed it to
the client library (one process, one clock). That covers the device-to-broker
hop, the daemon's group commit, the outbox publisher and its PUBACK, and the
broker-to-subscriber hop: what an operator's console sees.

The daemon's own view (receipt to the broker's PUBACK of the crisis message,
`fieldgate_crisis_publish_seconds`) is read from its metrics endpoint.

    .venv/bin/python -m benchmarks.crisis_latency [--rate 1000] [--crises 300]

Counts are taken at the receiving end (DESIGN.md: never trust a publisher's count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support import Client, Daemon, Mosquitto, daemon_env, free_port, wait_for


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class SyncLoad:
    """`devices` clients publishing single sync operations at `rate` a second in total."""

    def __init__(self, port: int, root: str, rate: float, devices: int) -> None:
        self.root = root
        self.rate = rate
        self.clients = []
        for _ in range(devices):
            client = Client(port)
            client.paho.max_inflight_messages_set(2000)
            client.paho.max_queued_messages_set(0)
            self.clients.append(client.connect())
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, c), daemon=True)
            for i, c in enumerate(self.clients)
        ]

    def _run(self, index: int, client: Client) -> None:
        per_device = self.rate / len(self.clients)
        interval = 1.0 / per_device
        topic = f"{self.root}/devices/load{index}/sync"
        start = time.monotonic()
        n = 0
        while not self._stop.is_set():
            due = start + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            op = {
                "op_id": f"l{index}-{n}-{uuid.uuid4().hex[:8]}",
                "user_id": f"u{index}",
                "entity_type": "task",
                "entity_id": f"t{index}-{n % 500}",
                "operation": "update",
                "changes": {"status": {"old": "open", "new": "done"}},
                "edited_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            }
            client.paho.publish(topic, json.dumps(op), qos=1)
            n += 1
            self.sent += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def run(
    rate: float, crises: int, spacing_s: float, devices: int, warmup_s: float
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fg-crisis-bench-"))
    broker = Mosquitto(workdir / "mosquitto", extra="user root").start()
    metrics_port = free_port()
    env = daemon_env(
        workdir / "daemon",
        broker.port,
        METRICS__LISTEN=f"127.0.0.1:{metrics_port}",
    )
    daemon = Daemon(workdir / "daemon", env)
    load: SyncLoad | None = None
    watcher = Client(broker.port)
    acks = Client(broker.port)
    device = Client(broker.port)
    try:
        daemon.start()
        root = daemon.root
        arrived: dict[str, float] = {}

        def on_crisis(_c: Any, _u: Any, message: Any) -> None:
            arrived.setdefault(json.loads(message.payload)["alert_id"], time.monotonic())

        watcher.paho.on_message = on_crisis
        watcher.connect().subscribe(f"{root}/alerts/crisis")
        acks.connect().subscribe(f"{root}/devices/+/sync/ack")
        device.connect()
        load = SyncLoad(broker.port, root, rate, devices)
        load.start()
        time.sleep(warmup_s)
        sent: dict[str, float] = {}
        started = time.monotonic()
        for n in range(crises):
            alert_id = f"crisis-{n}"
            body = json.dumps(
                {
                    "alert_id": alert_id,
                    "user_id": f"person-{n}",
                    "kind": "panic",
                    "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                    "site_id": "bench",
                }
            )
            sent[alert_id] = time.monotonic()
            device.paho.publish(f"{root}/devices/panic-button/alerts", body, qos=1)
            time.sleep(spacing_s)
        elapsed = time.monotonic() - started
        wait_for(lambda: len(arrived) >= crises, timeout=60)
        load.stop()
        ops_sent = load.sent
        acked_ops = sum(
            len(m.json()["results"]) for m in list(acks.all) if m.topic.endswith("/sync/ack")
        )
        latencies_ms = [(arrived[a] - sent[a]) * 1000 for a in sent]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        daemon_view = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("fieldgate_crisis_publish_seconds_")
        }
        return {
            "sync_rate_target": rate,
            "sync_ops_sent": ops_sent,
            "sync_ops_acked_seen": acked_ops,
            "sync_rate_achieved": round(ops_sent / (elapsed + warmup_s), 1),
            "crises": crises,
            "crises_received": len(arrived),
            "latency_ms": {
                "p50": round(percentile(latencies_ms, 50), 2),
                "p90": round(percentile(latencies_ms, 90), 2),
                "p99": round(percentile(latencies_ms, 99), 2),
                "max": round(max(latencies_ms), 2),
                "mean": round(statistics.fmean(latencies_ms), 2),
            },
            "daemon_histogram": {
                k: v
                for k, v in daemon_view.items()
                if k.endswith(("_count", "_sum"))
                or any(f'le="{b}"' in k for b in ("0.01", "0.025", "0.05", "0.1"))
            },
        }
    finally:
        if load is not None:
            load.stop()
        for client in (watcher, acks, device):
            client.close()
        daemon.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="sync ops/s in total")
    parser.add_argument("--crises", type=int, default=300)
    parser.add_argument("--spacing-ms", type=float, default=100.0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    args = parser.parse_args()
    result = run(args.rate, args.crises, args.spacing_ms / 1000, args.devices, args.warmup_s)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
