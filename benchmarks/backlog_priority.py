"""A crisis and an admin request behind a sync backlog, at the gateway's start (issue 15).

    .venv/bin/python -m benchmarks.backlog_priority [--messages 100000] [--repeat 3]

Target (issue 15, item 11): 100,000 sync messages queued for the gateway's session
plus one crisis alert published last: the crisis alert is published on
`<root>/alerts/crisis` within 1 s of the gateway's start, and an admin `health` is
answered within 1 s. A broker delivers a session's messages in order and the gateway
reads no further than it holds, so in one session both would wait for the whole
backlog; the priority lane (`<client_id>-priority`, gateway/mqtt/intake.py) is what
should make them not.

Each run, on benchmarks/drain.py's test-owned Mosquitto (persistence on,
`max_queued_messages 1000000`, `max_queued_bytes 0`), with drain.py's daemon (`python
-m gateway run`, the shipped config, SQLite) and backlog (loadgen, ~340-byte single
operations from 50 devices, the same N for every run):

1. the daemon starts on a fresh database, says READY=1 and stops on SIGTERM (exit 0):
   the database is migrated and the broker keeps both of its sessions with the
   subscriptions the daemon made itself, as after any stop;
2. N sync messages are published at QoS 1, then one `panic` alert on
   `<root>/devices/<device>/alerts`, then one admin `health` request (v5
   ResponseTopic and CorrelationData, no token: the shipped config sets none), each
   PUBACKed by the broker: the alert and the request queue after the whole backlog;
3. watchers with clean sessions subscribe to `<root>/alerts/crisis`, the response
   topic and `<root>/devices/+/sync/ack` (drain.py's ack counter);
4. the daemon starts again. Timed from just before its process is created (and from
   READY=1 on `$NOTIFY_SOCKET`) to the arrival of the crisis message naming the alert,
   of the `health` answer carrying the correlation data, and of the answer that makes
   every op_id answered `stored`.

The last is the baseline of the same run: in one session the crisis would have come
after about the whole backlog, so `crisis / backlog` is the share of that wait left
(and the sync operations answered before each arrival say which lane it came in).
Checked after each run: `sync_log` holds N rows of N distinct op_ids, `alerts` one
row, the panic's. Where the time went: the gateway's CPU (MQTT process, engine
process) sampled when the crisis arrives, and the steps of its start from its own log
(it runs at `info`, which logs no line per sync message): `starting` (imports,
settings and the database check done), each lane connected, the engine process
serving, READY=1, the alert committed.

`--profile start.txt` records both processes with py-spy (raw: collapsed stacks) from
their start until the crisis and the answer have come, into `start.<run>.mqtt.txt` and
`start.<run>.engine.txt`: for when the target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks import scoring_model
from benchmarks.drain import (
    _AckCounter,
    _client,
    _named,
    _rows,
    _start_profiler,
    backlog,
    child_running,
    cpu_seconds,
    machine,
    publish_backlog,
    start_gateway,
)
from tests.support import Mosquitto, NotifySocket, alert, end_process, free_port

TARGET_S = 1.0
"""Issue 15, item 11: the crisis published, and `health` answered, within 1 s of the start."""
PANIC_DEVICE = "bench-panic"


def log(message: str) -> None:
    print(f"[backlog_priority {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Urgent:
    """The two messages queued after the backlog, and where their answers come."""

    root: str
    alert_id: str
    response_topic: str
    correlation: bytes

    @property
    def crisis_topic(self) -> str:
        return f"{self.root}/alerts/crisis"

    def publish(self, port: int) -> None:
        """The panic alert, then the `health` request, each PUBACKed before returning."""
        client = _client(f"bench-urgent-{uuid.uuid4().hex[:8]}")
        connected = threading.Event()
        client.on_connect = lambda *_a: connected.set()
        client.connect("127.0.0.1", port, clean_start=True)
        client.loop_start()
        try:
            if not connected.wait(10):
                raise RuntimeError("the alert's publisher could not connect")
            body = alert(
                self.alert_id, user_id="u-bench", kind="panic", occurred_at=datetime.now(UTC)
            )
            sent = [
                client.publish(
                    f"{self.root}/devices/{PANIC_DEVICE}/alerts", json.dumps(body), qos=1
                )
            ]
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.response_topic
            props.CorrelationData = self.correlation
            request = {"transaction": f"tx-{self.alert_id}"}
            sent.append(
                client.publish(
                    f"{self.root}/admin/request/health",
                    json.dumps(request),
                    qos=1,
                    properties=props,
                )
            )
            for info in sent:
                info.wait_for_publish(10)
                if not info.is_published():
                    raise RuntimeError("the broker did not PUBACK the alert or the request")
        finally:
            client.disconnect()
            client.loop_stop()


class _Watch:
    """When the crisis naming the alert, and the answer carrying the correlation data,
    arrive (a clean session, subscribed before the daemon starts), and how many sync
    operations had been answered by then: about all of them, had they come in the sync
    lane's order."""

    def __init__(self, port: int, urgent: Urgent, acks: _AckCounter) -> None:
        self.urgent = urgent
        self.acks = acks
        self.crisis_at: float | None = None
        self.crisis: dict[str, Any] | None = None
        self.answered_before_crisis = 0
        self.answer_at: float | None = None
        self.answer: dict[str, Any] | None = None
        self.answered_before_answer = 0
        self.client = _client(f"bench-watch-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port, clean_start=True)
        self.client.loop_start()
        self.client.subscribe([(urgent.crisis_topic, 1), (urgent.response_topic, 1)])
        if not subscribed.wait(10):
            raise RuntimeError("the watcher could not subscribe")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        at = time.time()
        with self.acks.lock:
            answered = len(self.acks.stored)
        body = json.loads(message.payload)
        if message.topic == self.urgent.crisis_topic:
            if self.crisis is None and body.get("alert_id") == self.urgent.alert_id:
                self.crisis, self.crisis_at = body, at
                self.answered_before_crisis = answered
        elif (
            self.answer is None
            and getattr(message.properties, "CorrelationData", None) == self.urgent.correlation
            and body.get("status") != "accepted"
        ):
            self.answer, self.answer_at = body, at
            self.answered_before_answer = answered

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_start(port: int, root: str, client_id: str, workdir: Path) -> float:
    """Start the daemon on a fresh database until READY=1, then stop it cleanly: the
    broker keeps both lanes' sessions as the daemon subscribed them. Its seconds to
    READY=1."""
    notify = NotifySocket(workdir / "notify-first.sock")
    started = time.time()
    with open(workdir / "gateway-first.log", "ab") as out:
        proc = start_gateway(port, root, client_id, workdir / "bench.db", notify, free_port(), out)
    try:
        deadline = time.monotonic() + 60
        while notify.ready_at is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ready_at = notify.ready_at
    finally:
        end_process(proc)
        notify.close()
    if ready_at is None or proc.returncode != 0:
        tail = (workdir / "gateway-first.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the first start: ready {ready_at}, exit {proc.returncode}: {tail}")
    return ready_at - started


TIMELINE = {
    "starting": "starting",
    "engine process serving": "engine serving",
    "ready": "READY=1",
    "alert stored": "alert committed",
}
"""Lines of the daemon's log (info) that mark the crisis's way, and their names here;
`mqtt connected` is named by its lane."""


def timeline(log_path: Path, started: float) -> dict[str, float]:
    """Seconds from the start to the first of each TIMELINE event in the daemon's log."""
    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            event = entry["event"]
            name = (
                f"{entry['lane']} lane connected"
                if event == "mqtt connected"
                else TIMELINE.get(event)
            )
            if name is not None and name not in found:
                at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
                found[name] = round(at.timestamp() - started, 3)
    return dict(sorted(found.items(), key=lambda item: item[1]))


def _cpu(pid: int | None) -> float:
    return round(sum(cpu_seconds(pid).values()), 2) if pid else 0.0


def behind_backlog(
    port: int,
    root: str,
    client_id: str,
    n: int,
    urgent: Urgent,
    workdir: Path,
    timeout_s: float,
    profile: Path | None,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    """Start the daemon with everything queued; the times of what came, from its start."""
    db = workdir / "bench.db"
    acks = _AckCounter(port, root, n)
    watch = _Watch(port, urgent, acks)
    notify = NotifySocket(workdir / "notify.sock")
    spies: list[subprocess.Popen[bytes]] = []
    load_before = os.getloadavg()[0]
    started = time.time()
    # At info the daemon logs the steps of its start (TIMELINE), and nothing per message.
    env = {"FIELDGATE_LOG__LEVEL": "info", **extra_env}
    with open(workdir / "gateway.log", "ab") as out:
        proc = start_gateway(port, root, client_id, db, notify, free_port(), out, env)
    try:
        if profile is not None:
            spies.append(_start_profiler(proc.pid, _named(profile, "mqtt"), "raw"))
        engine_pid: int | None = None
        cpu_at_crisis: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (workdir / "gateway.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"gateway exited {proc.returncode}: {tail}")
            if engine_pid is None:
                engine_pid = child_running(proc.pid, "gateway.ingest.process")
                if engine_pid is not None and profile is not None:
                    spies.append(_start_profiler(engine_pid, _named(profile, "engine"), "raw"))
            urgent_done = watch.crisis_at is not None and watch.answer_at is not None
            if watch.crisis_at is not None and not cpu_at_crisis:
                cpu_at_crisis = {"mqtt": _cpu(proc.pid), "engine": _cpu(engine_pid)}
            if urgent_done:
                for spy in spies:
                    end_process(spy, signal.SIGINT)
                spies.clear()
                if acks.done_at is not None and _rows(db) >= n:
                    break
            # Fine-grained while the urgent two are awaited (the CPU sampled at the crisis).
            time.sleep(0.25 if urgent_done else 0.005)
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            ((rows, distinct),) = conn.execute(
                "select count(*), count(distinct op_id) from sync_log"
            ).fetchall()
            alerts = [a for (a,) in conn.execute("select alert_id from alerts").fetchall()]
    finally:
        for spy in spies:
            end_process(spy, signal.SIGINT)
        end_process(proc)
        acks.close()
        watch.close()
        notify.close()
    if watch.crisis_at is None or watch.answer_at is None or acks.done_at is None:
        raise RuntimeError(
            f"within {timeout_s:.0f} s: crisis {watch.crisis_at}, answer {watch.answer_at},"
            f" {len(acks.stored)} of {n} answered stored"
        )
    if (rows, distinct) != (n, n) or alerts != [urgent.alert_id]:
        raise RuntimeError(
            f"stored: {rows} sync rows of {distinct} op_ids (not {n}), alerts {alerts}"
        )
    assert watch.answer is not None
    ready_at = notify.ready_at

    def since(at: float | None, origin: float | None) -> float | None:
        return None if at is None or origin is None else round(at - origin, 3)

    return {
        "crisis_s": since(watch.crisis_at, started),
        "health_s": since(watch.answer_at, started),
        "backlog_s": since(acks.done_at, started),
        "first_sync_answer_s": since(acks.first_at, started),
        "ready_s": since(ready_at, started),
        "from_ready": {
            "crisis_s": since(watch.crisis_at, ready_at),
            "health_s": since(watch.answer_at, ready_at),
            "backlog_s": since(acks.done_at, ready_at),
        },
        "sync_answered_before": {
            "crisis": watch.answered_before_crisis,
            "health": watch.answered_before_answer,
        },
        "crisis_over_backlog": round((watch.crisis_at - started) / (acks.done_at - started), 4),
        "health_over_backlog": round((watch.answer_at - started) / (acks.done_at - started), 4),
        "timeline": timeline(workdir / "gateway.log", started),
        "health_status": watch.answer.get("status"),
        "healthy": watch.answer.get("data", {}).get("healthy"),
        "health_failing": sorted(
            name
            for name, check in watch.answer.get("data", {}).get("checks", {}).items()
            if not check.get("ok")
        ),
        "crisis_reasons": (watch.crisis or {}).get("reasons"),
        "cpu_at_crisis_s": cpu_at_crisis,
        "sync_rows": rows,
        "distinct_op_ids": distinct,
        "alerts": alerts,
        "answered_other": acks.other,
        "exit_code": proc.returncode,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def run_one(
    messages: Sequence[tuple[str, bytes]], args: argparse.Namespace, base: Path, index: int
) -> dict[str, Any]:
    tag = f"priority{index}-{uuid.uuid4().hex[:6]}"
    workdir = base / tag
    workdir.mkdir(parents=True)
    root = f"bench{uuid.uuid4().hex[:6]}"
    client_id = f"bench-{tag}"
    urgent = Urgent(
        root,
        alert_id=f"panic-{uuid.uuid4().hex[:8]}",
        response_topic=f"bench/answers/{uuid.uuid4().hex[:8]}",
        correlation=uuid.uuid4().bytes,
    )
    profile = None
    if args.profile is not None:
        profile = Path(args.profile).with_suffix(f".{index + 1}{Path(args.profile).suffix}")
    # Saved on a clean stop only (drain.py: a save every second would time the disk).
    broker = Mosquitto(workdir / "mosquitto", autosave_interval=3600).start()
    try:
        first_ready_s = first_start(broker.port, root, client_id, workdir)
        if args.model is not None:
            scoring_model.install(workdir / "bench.db", args.model)
        took = publish_backlog(broker.port, root, messages)
        urgent.publish(broker.port)
        log(
            f"#{index + 1}: {len(messages)} sync messages, the alert and `health` queued in"
            f" {took:.1f} s; starting the gateway"
        )
        env = dict(kv.split("=", 1) for kv in args.gateway_env)
        result = behind_backlog(
            broker.port,
            root,
            client_id,
            len(messages),
            urgent,
            workdir,
            args.timeout,
            profile,
            env,
        )
        result["first_start_ready_s"] = round(first_ready_s, 3)
        result["publish_s"] = round(took, 2)
        log(
            f"#{index + 1}: crisis {result['crisis_s']:.3f} s, health {result['health_s']:.3f} s,"
            f" backlog {result['backlog_s']:.1f} s after the start"
        )
        return result
    finally:
        broker.stop(30, kill=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _median(runs: list[dict[str, Any]], key: str, within: str | None = None) -> float | None:
    values = [(r[within] if within else r).get(key) for r in runs]
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backlog_priority", description=__doc__
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=0.0, help="per run [default: scaled]")
    parser.add_argument(
        "--profile", help="py-spy raw output of both processes until the crisis and the answer"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the gateway's timed start (repeatable)",
    )
    parser.add_argument(
        "--scoring",
        action="store_true",
        help="a random forest active (benchmarks/scoring_model.py): the engine loads it at start",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.repeat < 1:
        parser.error("--messages and --repeat must be at least 1")
    if not args.timeout:
        args.timeout = max(120.0, args.messages / 200)

    log(f"making {args.messages} operations from {args.devices} devices")
    messages = backlog(args.messages, args.devices, args.seed, 0.0)
    base = Path(tempfile.mkdtemp(prefix="fieldgate-backlog-priority-"))
    args.model = None
    if args.scoring:
        log("training the model the gateway loads at its start")
        args.model = scoring_model.prepare(base / "model")
    try:
        runs = [run_one(messages, args, base, index) for index in range(args.repeat)]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    medians = {
        key: _median(runs, key)
        for key in ("crisis_s", "health_s", "backlog_s", "first_sync_answer_s", "ready_s")
    }
    from_ready = {
        key: _median(runs, key, "from_ready") for key in ("crisis_s", "health_s", "backlog_s")
    }
    report: dict[str, Any] = {
        "machine": machine(),
        "messages": args.messages,
        "repeat": args.repeat,
        "gateway_env": args.gateway_env,
        "scoring": args.scoring,
        "target_s": TARGET_S,
        "median": medians,
        "median_from_ready": from_ready,
        "crisis_over_backlog": _ratio(medians["crisis_s"], medians["backlog_s"]),
        "health_over_backlog": _ratio(medians["health_s"], medians["backlog_s"]),
        "met": {
            "crisis": (medians["crisis_s"] or float("inf")) <= TARGET_S,
            "health": (medians["health_s"] or float("inf")) <= TARGET_S,
        },
        "runs": runs,
    }
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 0


def _ratio(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 4) if part is not None and whole else None


def _text(report: dict[str, Any]) -> str:
    m = report["machine"]

    def pair(times: dict[str, Any], ready: dict[str, Any], key: str) -> str:
        since_start, since_ready = times.get(key), ready.get(key)
        if since_start is None:
            return "-"
        return f"{since_start:.3f} ({'-' if since_ready is None else f'{since_ready:.3f}'})"

    def row(label: str, times: dict[str, Any], ready: dict[str, Any]) -> str:
        cells = [pair(times, ready, key) for key in ("crisis_s", "health_s", "backlog_s")]
        at_ready = times.get("ready_s")
        return (
            f"{label:<8}{cells[0]:>18}{cells[1]:>18}{cells[2]:>18}"
            f"{'-' if at_ready is None else f'{at_ready:.3f}':>9}"
        )

    lines = [
        f"{report['messages']:,} sync messages queued, then a panic alert and `health`;"
        f" {report['repeat']} run(s); {m['nproc']} CPUs {m['cpu']}, Python {m['python']},"
        f" Mosquitto {m['mosquitto']}",
        "",
        "seconds after the process start (after READY=1 in brackets)",
        f"{'run':<8}{'crisis':>18}{'health':>18}{'last sync':>18}{'READY=1':>9}"
        f"{'crisis/backlog':>16}{'CPU at crisis':>18}{'load':>10}",
    ]
    for index, r in enumerate(report["runs"], 1):
        cpu = r["cpu_at_crisis_s"]
        lines.append(
            row(str(index), r, r["from_ready"])
            + f"{r['crisis_over_backlog']:>16.4f}"
            + f"{cpu.get('mqtt', 0):>10.2f} +{cpu.get('engine', 0):>5.2f}"
            + f"{r['load_before']:>6.1f}-{r['load_after']:.1f}"
        )
    lines.append(row("median", report["median"], report["median_from_ready"]))
    lines += ["", "the start, step by step (seconds after the process start; the daemon's log)"]
    for index, r in enumerate(report["runs"], 1):
        steps = ", ".join(f"{name} {at:.2f}" for name, at in r["timeline"].items())
        health = "healthy" if r["healthy"] else f"not healthy ({', '.join(r['health_failing'])})"
        lines.append(f"{index:<8}{steps}; health answered {r['health_status']}, {health}")
        before = r["sync_answered_before"]
        lines.append(
            f"{'':<8}sync operations answered before the crisis {before['crisis']:,},"
            f" before the health answer {before['health']:,} (of {report['messages']:,})"
        )
    met = report["met"]
    lines += [
        "",
        "CPU at crisis: the gateway's MQTT process + engine process, from their start",
        f"crisis / backlog (medians): {report['crisis_over_backlog']}"
        f"; health / backlog: {report['health_over_backlog']}",
        f"crisis within {TARGET_S:.0f} s of the start: {'met' if met['crisis'] else 'NOT met'};"
        f" health within {TARGET_S:.0f} s: {'met' if met['health'] else 'NOT met'}",
        "every run: all sync operations stored once, one alert row",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
