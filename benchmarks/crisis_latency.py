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

With `--escalate-after-s` shorter than the run (e.g. 1), no crisis is acknowledged
and each escalates `--escalations` times: how late each escalation was written
after it fell due (its outbox row's time minus the previous one's, minus the
interval) is reported too. Its upper bound was a test's once (`gap < 10 s` in
tests/test_alerts.py); a wall-clock bound belongs here, on a quiet machine.

    .venv/bin/python -m benchmarks.crisis_latency [--rate 1000] [--crises 300]
    .venv/bin/python -m benchmarks.crisis_latency --crises 20 --escalate-after-s 1

Counts are taken at the receiving end (DESIGN.md: never trust a publisher's count).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import shutil
import statistics
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    daemon_env,
    db_rows,
    free_port,
    pg_admin_url,
    pg_database,
    wait_for,
)


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _load_device(port: int, root: str, index: int, per_device: float, stop: Any, sent: Any) -> None:
    """One simulated device, in its own process: single sync operations, paced."""
    client = Client(port)
    client.paho.max_inflight_messages_set(2000)
    client.paho.max_queued_messages_set(0)
    client.connect()
    interval = 1.0 / per_device
    topic = f"{root}/devices/load{index}/sync"
    start = time.monotonic()
    n = 0
    try:
        while not stop.is_set():
            delay = start + n * interval - time.monotonic()
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
            with sent.get_lock():
                sent.value += 1
    finally:
        client.close()


class SyncLoad:
    """`devices` processes publishing single sync operations at `rate` a second in total.

    Separate processes: the measuring process only holds the crisis device and the
    subscriber, so the load generator's own CPU and GIL do not inflate the figures.
    """

    def __init__(self, port: int, root: str, rate: float, devices: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._sent = ctx.Value("q", 0)
        self._procs = [
            ctx.Process(
                target=_load_device,
                args=(port, root, i, rate / devices, self._stop, self._sent),
                daemon=True,
            )
            for i in range(devices)
        ]

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    def start(self) -> None:
        for proc in self._procs:
            proc.start()

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(10)


def run(
    rate: float,
    crises: int,
    spacing_s: float,
    devices: int,
    warmup_s: float,
    db_url: str | None = None,
    escalate_after_s: float = 300.0,
    escalations: int = 3,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fg-crisis-bench-"))
    broker = Mosquitto(workdir / "mosquitto", extra="user root").start()
    metrics_port = free_port()
    env = daemon_env(
        workdir / "daemon",
        broker.port,
        db_url,
        METRICS__LISTEN=f"127.0.0.1:{metrics_port}",
        ALERTS__ESCALATE_AFTER_S=str(escalate_after_s),
        ALERTS__MAX_ESCALATIONS=str(escalations),
    )
    daemon = Daemon(workdir / "daemon", env)
    load: SyncLoad | None = None
    watcher = Client(broker.port)
    device = Client(broker.port)
    try:
        daemon.start()
        root = daemon.root
        arrived: dict[str, float] = {}

        def on_crisis(_c: Any, _u: Any, message: Any) -> None:
            arrived.setdefault(json.loads(message.payload)["alert_id"], time.monotonic())

        watcher.paho.on_message = on_crisis
        watcher.connect().subscribe(f"{root}/alerts/crisis")
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
        lateness_ms = (
            escalation_lateness_ms(daemon, escalate_after_s, escalations)
            if escalate_after_s * escalations < 120
            else None
        )
        load.stop()
        ops_sent = load.sent
        latencies_ms = [(arrived[a] - sent[a]) * 1000 for a in sent]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        daemon_view = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("fieldgate_crisis_publish_seconds_")
        }
        commits = {
            line.split(" ")[0].replace("fieldgate_commit_seconds_", ""): float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith("fieldgate_commit_seconds_")
            and any(f'le="{b}"' in line for b in ("0.01", "0.05", "0.25", "1.0", "+Inf"))
        }
        return {
            "sync_rate_target": rate,
            "sync_ops_sent": ops_sent,
            "sync_ops_stored": metric(metrics, 'fieldgate_sync_ops_total{status="stored"}'),
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
            "commit_seconds": commits,
            "escalation_lateness_ms": None
            if lateness_ms is None
            else {
                "escalations": len(lateness_ms),
                "p50": round(percentile(lateness_ms, 50), 2),
                "p99": round(percentile(lateness_ms, 99), 2),
                "max": round(max(lateness_ms), 2),
                "min": round(min(lateness_ms), 2),
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
        for client in (watcher, device):
            client.close()
        daemon.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def escalation_lateness_ms(daemon: Daemon, after_s: float, escalations: int) -> list[float]:
    """Once every crisis has escalated `escalations` times: how late each escalation's
    outbox row was written after it fell due (negative would be early: a bug)."""
    wait_for(
        lambda: (
            db_rows(
                daemon.db_url, "select count(*) from alerts where next_escalation_at is not null"
            )
            == [(0,)]
        ),
        timeout=after_s * escalations + 120,
    )
    written: dict[str, list[int]] = {}
    for payload, created_at in db_rows(
        daemon.db_url,
        "select payload, created_at from outbox where channel = 'mqtt'"
        " and event_type like 'alert.crisis%' order by id",
    ):
        written.setdefault(json.loads(payload)["alert_id"], []).append(created_at)
    return [
        (later - earlier) / 1000 - after_s * 1000
        for times in written.values()
        for earlier, later in itertools.pairwise(times)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="sync ops/s in total")
    parser.add_argument("--crises", type=int, default=300)
    parser.add_argument("--spacing-ms", type=float, default=100.0)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument(
        "--postgres", action="store_true", help="a fresh database on FIELDGATE_TEST_PG_URL"
    )
    parser.add_argument(
        "--escalate-after-s",
        type=float,
        default=300.0,
        help="with escalations x this < 120 s, crises escalate during the run and their"
        " lateness is measured",
    )
    parser.add_argument("--escalations", type=int, default=3)
    args = parser.parse_args()
    spacing_s = args.spacing_ms / 1000
    options = (args.rate, args.crises, spacing_s, args.devices, args.warmup_s)
    schedule = {"escalate_after_s": args.escalate_after_s, "escalations": args.escalations}
    if args.postgres:
        with pg_database(pg_admin_url()) as url:
            result = run(*options, url, **schedule)
    else:
        result = run(*options, **schedule)
    result["database"] = "postgresql" if args.postgres else "sqlite"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
