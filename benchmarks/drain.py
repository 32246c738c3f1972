"""Drain benchmark: how fast the gateway empties a broker backlog, against a ceiling and a baseline.

    .venv/bin/python -m benchmarks.drain [--messages 100000] [--repeat 3]

For each variant and repetition, on a test-owned Mosquitto (`tests.support.Mosquitto`:
free port, persistence on, `max_queued_messages 1000000`, `max_queued_bytes 0`):

1. create the subscriber's persistent session (MQTT v5, its client id,
   `clean_start=False`, a `SessionExpiryInterval`, `<root>/devices/+/sync` at
   QoS 1) and disconnect, so that the backlog queues for it;
2. publish N single-operation messages (made by `loadgen.generator`: realistic,
   ~340 bytes, from 50 devices) at QoS 1 and count the PUBACKs: all N queued;
3. drain them with the variant, counting at the receiving end:

- `gateway`: the real daemon (`python -m gateway run`, the shipped config with
  environment overrides, SQLite WAL + synchronous=FULL). Done when a subscriber
  on `<root>/devices/+/sync/ack` has seen every op_id answered `stored` (the
  gateway answers only after the commit, and PUBACKs with it) and `sync_log`
  holds N rows; afterwards, its session is checked to hold nothing queued.
  Timed from the first row's `received_at` (and, second, from READY=1 on
  `$NOTIFY_SOCKET`, which comes late: the SUBACK that makes the gateway ready
  is read after the backlog the broker sent ahead of it) to the arrival of the
  last answer. Its CPU is counted from the first answer to the last.
- `bare`: a paho 2.x MQTT v5 subscriber with `manual_ack`, acking each message
  as it arrives and doing nothing else: the ceiling.
- `naive`: the same, but it json-decodes each message, inserts it into SQLite
  and commits (WAL, synchronous=FULL) before acking it: one fsync per message,
  the baseline.

`bare` and `naive` are timed from their first message to their N-th ack.
Rates are messages a second; with `--repeat`, medians.

Webhooks (issue 13: the drain with two endpoints at least 0.9 of its rate without):

    .venv/bin/python -m benchmarks.drain --messages 100000 --repeat 3 --webhooks 2

`--webhooks N` adds the variant `gateway-webhooks`: `gateway` (detection on, the
shipped config) with N endpoints (`FIELDGATE_WEBHOOKS`), each subscribed to `"*"`
with the defaults (`max_in_flight` 8, timeout 15 s), all posting to one fast
receiver (`benchmarks/receiver.py`, a process of its own for the whole run,
reset before each drain) at `/hook/<endpoint>`; its dead-letter queue in Redis
database 15 (`--redis`). Given without `--variants`, the variants are
`gateway,gateway-webhooks`, alternating, and the ratio of their medians is
printed. Reported for each such drain: the webhook events the engine wrote
(outbox rows of channel `webhook`), the deliveries fanned out, those the
receiver had and those still waiting when the last op was answered, and how
long after that every delivery had arrived (the sender catching up, not part
of the drain's time). Nothing changes when `--webhooks` is not given.

Scoring (issue 14: a model active costs at most 15% of the drain's rate):

    .venv/bin/python -m benchmarks.drain --messages 100000 --repeat 3 --scoring

`--scoring` adds the variant `gateway-model`: `gateway` with a random forest
active from the first batch (trained once per run on a causal log of 20,000
operations, `benchmarks/scoring_model.py`, and installed as the active model of
each drain's fresh database), so every stored operation is scored and those at
or above `ml.hint_threshold` get a hint. Given without `--variants`, the
variants are `gateway,gateway-model`, alternating, and the ratio of their
medians is printed; each such drain also reports how many operations were scored
and hinted (the gateway's metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks import scoring_model
from benchmarks.receiver import ReceiverProcess
from gateway.config import load as load_config
from loadgen.generator import GeneratorOptions, generate
from storage.conflict_store import WAITING_SQL
from tests.support import ROOT, Mosquitto, NotifySocket, end_process, free_port, memory_mib

VARIANTS = ("bare", "naive", "gateway", "gateway-off")
"""`gateway` runs the shipped config (conflict detection on); `gateway-off` the same
with `conflicts.enabled = false`, the baseline of what detection costs."""
WEBHOOK_VARIANT = "gateway-webhooks"
"""`gateway` with `--webhooks N` endpoints (only with `--webhooks`)."""
MODEL_VARIANT = "gateway-model"
"""`gateway` with a conflict model active (only with `--scoring`)."""
WEBHOOK_SECRET = "whsec_" + "ZmllbGRnYXRlLWJlbmNobWFyay1zaWduaW5nLWtleS0wMQ=="
SESSION_EXPIRY_S = 3600
CONFIG = ROOT / "config" / "fieldgate.toml"


def log(message: str) -> None:
    print(f"[drain {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- MQTT helpers ---------------------------------------------------------------


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


def _connect_props(receive_maximum: int | None = None) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def create_session(port: int, client_id: str, topic: str) -> None:
    """Make the broker keep a persistent session subscribed to `topic`, then leave."""
    client = _client(client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect("127.0.0.1", port, clean_start=False, properties=_connect_props())
    client.loop_start()
    try:
        result, _mid = client.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS or not subscribed.wait(10):
            raise RuntimeError(f"could not subscribe {client_id} to {topic}")
    finally:
        client.disconnect()
        client.loop_stop()


def publish_backlog(port: int, root: str, messages: Sequence[tuple[str, bytes]]) -> float:
    """Publish at QoS 1, at most 1000 unacknowledged; return the seconds it took."""
    client = _client(f"bench-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    slots = threading.Semaphore(1000)
    pubacks = 0
    lock = threading.Lock()
    connected = threading.Event()

    def on_publish(*_a: Any) -> None:
        nonlocal pubacks
        with lock:
            pubacks += 1
        slots.release()

    client.on_publish = on_publish
    client.on_connect = lambda *_a: connected.set()
    client.connect("127.0.0.1", port, clean_start=True)
    client.loop_start()
    started = time.monotonic()
    try:
        if not connected.wait(10):
            raise RuntimeError("publisher could not connect")
        for device_id, body in messages:
            if not slots.acquire(timeout=30):
                raise RuntimeError("no PUBACK for 30 s while publishing the backlog")
            info = client.publish(f"{root}/devices/{device_id}/sync", body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish refused: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if pubacks >= len(messages):
                    break
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    if pubacks != len(messages):
        raise RuntimeError(f"only {pubacks} of {len(messages)} publishes were acknowledged")
    return time.monotonic() - started


def leftover(port: int, client_id: str, wait_s: float = 1.0) -> list[str]:
    """What the broker still holds for `client_id`'s session (not acked here): topics."""
    client = _client(client_id)
    client.manual_ack_set(True)
    topics: list[str] = []

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        topics.append(message.topic)

    client.on_message = on_message
    client.connect("127.0.0.1", port, clean_start=False, properties=_connect_props())
    client.loop_start()
    time.sleep(wait_s)
    client.disconnect()
    client.loop_stop()
    return topics


# -- CPU accounting ---------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of a process, by thread id."""
    out: dict[int, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def children(pid: int) -> list[int]:
    """The child processes of `pid` (the gateway's engine and poster processes), made
    by any of its threads."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(child) for child in (task / "children").read_text().split())
    return out


def child_running(pid: int, module: str) -> int | None:
    """The child process of `pid` that runs `python -m module`, if there is one."""
    for child in children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in argv:
            return child
    return None


def cpu_delta(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU used between two samples: the main thread, and the threads alive at the end."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    threads = sum(t - before.get(tid, 0.0) for tid, t in after.items() if tid != pid)
    return {"main": round(main, 2), "threads": round(threads, 2)}


def scrape(port: int) -> dict[str, float]:
    """The gateway's Prometheus series (unlabelled ones and _sum/_count), by name."""
    import urllib.request

    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("#") or "{" in line or " " not in line:
                continue
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# -- results ------------------------------------------------------------------


@dataclass
class Drain:
    variant: str
    messages: int
    received: int
    seconds: float
    timed_from: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


class _Subscriber:
    """bare / naive: drain `client_id`'s session on this thread with paho's own loop."""

    def __init__(
        self,
        port: int,
        client_id: str,
        n: int,
        receive_maximum: int,
        handle: Callable[[mqtt.MQTTMessage], None] | None,
    ) -> None:
        self.n = n
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.connected_at: float | None = None
        self.handle = handle
        client = _client(client_id)
        client.manual_ack_set(True)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        self.client = client
        self.port = port
        self.receive_maximum = receive_maximum

    def _on_connect(self, *_a: Any) -> None:
        self.connected_at = time.time()

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if self.first is None:
            self.first = time.time()
        if self.handle is not None:
            self.handle(message)
        client.ack(message.mid, message.qos)
        self.count += 1
        if self.count == self.n:
            self.last = time.time()
            client.disconnect()

    def run(self, timeout_s: float) -> None:
        self.client.connect(
            "127.0.0.1",
            self.port,
            clean_start=False,
            properties=_connect_props(self.receive_maximum),
        )
        timer = threading.Timer(timeout_s, self.client.disconnect)
        timer.start()
        try:
            self.client.loop_forever()
        finally:
            timer.cancel()


def drain_bare(port: int, client_id: str, n: int, receive_maximum: int, timeout_s: float) -> Drain:
    sub = _Subscriber(port, client_id, n, receive_maximum, None)
    me = os.getpid()
    before = cpu_seconds(me)
    sub.run(timeout_s)
    return _subscriber_result("bare", sub, n, {"cpu_s": cpu_delta(me, before, cpu_seconds(me))})


NAIVE_SCHEMA = """
create table if not exists sync_log (
    id integer primary key,
    op_id text not null unique,
    device_id text not null,
    user_id text not null,
    entity_type text not null,
    entity_id text not null,
    operation text not null,
    changes text not null,
    edited_at text not null,
    received_at integer not null
)
"""


def drain_naive(
    port: int, client_id: str, n: int, receive_maximum: int, timeout_s: float, db: Path
) -> Drain:
    conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
    conn.execute("pragma journal_mode=WAL")
    conn.execute("pragma synchronous=FULL")
    conn.execute(NAIVE_SCHEMA)

    def handle(message: mqtt.MQTTMessage) -> None:
        op = json.loads(message.payload)
        device_id = message.topic.rsplit("/", 2)[-2]
        conn.execute("begin")
        conn.execute(
            "insert into sync_log (op_id, device_id, user_id, entity_type, entity_id,"
            " operation, changes, edited_at, received_at) values (?,?,?,?,?,?,?,?,?)"
            " on conflict (op_id) do nothing",
            (
                op["op_id"],
                device_id,
                op["user_id"],
                op["entity_type"],
                op["entity_id"],
                op["operation"],
                json.dumps(op.get("changes", {})),
                op["edited_at"],
                time.time_ns() // 1000,
            ),
        )
        conn.execute("commit")

    sub = _Subscriber(port, client_id, n, receive_maximum, handle)
    me = os.getpid()
    before = cpu_seconds(me)
    try:
        sub.run(timeout_s)
        cpu = cpu_delta(me, before, cpu_seconds(me))
        (rows,) = conn.execute("select count(*) from sync_log").fetchone()
    finally:
        conn.close()
    return _subscriber_result("naive", sub, n, {"rows": rows, "cpu_s": cpu})


def _subscriber_result(variant: str, sub: _Subscriber, n: int, extra: dict[str, Any]) -> Drain:
    if sub.count < n or sub.first is None or sub.last is None:
        raise RuntimeError(f"{variant}: received {sub.count} of {n} before the timeout")
    if sub.connected_at is not None:
        extra["from_connect_s"] = round(sub.last - sub.connected_at, 3)
    return Drain(
        variant,
        n,
        sub.count,
        sub.last - sub.first,
        "first message received -> last message acked",
        extra,
    )


# -- the gateway ----------------------------------------------------------------


class _AckCounter:
    """Counts op_ids answered `stored` on `<root>/devices/+/sync/ack`."""

    def __init__(self, port: int, root: str, n: int) -> None:
        self.n = n
        self.stored: set[str] = set()
        self.other = 0
        self.messages = 0
        self.done_at: float | None = None
        self.first_at: float | None = None
        self.lock = threading.Lock()
        self.client = _client(f"bench-acks-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port, clean_start=True)
        self.client.loop_start()
        self.client.subscribe(f"{root}/devices/+/sync/ack", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the ack counter could not subscribe")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        results = json.loads(message.payload).get("results", [])
        with self.lock:
            self.messages += 1
            if self.first_at is None:
                self.first_at = time.time()
            for result in results:
                if result.get("status") == "stored":
                    self.stored.add(result["op_id"])
                else:
                    self.other += 1
            if self.done_at is None and len(self.stored) >= self.n:
                self.done_at = time.time()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            (count,) = conn.execute("select count(*) from sync_log").fetchone()
            return int(count)
    except sqlite3.Error:
        return 0


def _webhook_counts(db: Path, receiver: ReceiverProcess) -> dict[str, int]:
    """Webhook events written (outbox rows), fanned out, deliveries waiting and dead in
    the database; requests the receiver had."""
    received = receiver.count()
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        events, fanned = conn.execute(
            "select count(*), count(sent_at) from outbox where channel = 'webhook'"
        ).fetchone()
        waiting, dead = conn.execute(
            "select count(*) - count(dead_at), count(dead_at) from webhook_deliveries"
        ).fetchone()
    return {
        "events": int(events),
        "fanned_out": int(fanned),
        "deliveries_waiting": int(waiting or 0),
        "deliveries_dead": int(dead or 0),
        "received": int(received["requests"]),
        "received_distinct": int(received["distinct"]),
    }


def _catch_up(
    db: Path, receiver: ReceiverProcess, done_at: float | None, limit_s: float
) -> dict[str, Any]:
    """Wait until every webhook event is fanned out and every delivery settled (or
    `limit_s`); how long after the drain's end that was, and the counts then."""
    deadline = time.monotonic() + limit_s
    counts = _webhook_counts(db, receiver)
    while time.monotonic() < deadline and (
        counts["fanned_out"] < counts["events"] or counts["deliveries_waiting"]
    ):
        time.sleep(0.1)
        counts = _webhook_counts(db, receiver)
    caught_up = not (counts["fanned_out"] < counts["events"] or counts["deliveries_waiting"])
    after = round(time.time() - done_at, 2) if caught_up and done_at is not None else None
    return {"at_end": counts, "caught_up_after_s": after}


def start_gateway(
    port: int,
    root: str,
    client_id: str,
    db: Path,
    notify: NotifySocket,
    metrics_port: int,
    out: IO[bytes],
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """The real daemon (`python -m gateway run`, the shipped config) on the broker at
    `port` and the SQLite database `db`, as systemd would run it (READY=1 to `notify`,
    no watchdog): shared by the benchmarks that time the daemon itself."""
    env = {
        **os.environ,
        "FIELDGATE_MQTT__HOST": "127.0.0.1",
        "FIELDGATE_MQTT__PORT": str(port),
        "FIELDGATE_MQTT__CLIENT_ID": client_id,
        "FIELDGATE_MQTT__TOPIC_ROOT": root,
        "FIELDGATE_DATABASE__URL": f"sqlite+aiosqlite:///{db}",
        "FIELDGATE_LOG__LEVEL": "warning",
        "FIELDGATE_LOG__FORMAT": "json",
        "FIELDGATE_INSTANCE": f"bench-{client_id}",
        "NOTIFY_SOCKET": str(notify.path),
        "FIELDGATE_METRICS__LISTEN": f"127.0.0.1:{metrics_port}",
        **(extra_env or {}),
    }
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(CONFIG)],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def drain_gateway(
    port: int,
    root: str,
    client_id: str,
    n: int,
    timeout_s: float,
    workdir: Path,
    profile: Path | None,
    profile_format: str,
    extra_env: dict[str, str] | None = None,
    receiver: ReceiverProcess | None = None,
) -> Drain:
    db = workdir / "bench.db"
    metrics_port = free_port()
    if receiver is not None:
        receiver.reset()
    webhooks: dict[str, Any] = {}
    notify = NotifySocket(workdir / "notify.sock")
    acks = _AckCounter(port, root, n)
    out = open(workdir / "gateway.log", "ab")  # noqa: SIM115
    proc = start_gateway(port, root, client_id, db, notify, metrics_port, out, extra_env)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + timeout_s
        rows = 0
        # CPU is counted from the first answer: READY=1 comes late when a backlog waits
        # (the SUBACK is read after the messages the broker sent ahead of it).
        while acks.first_at is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.001)
        cpu_at_first = cpu_seconds(proc.pid)
        own_at_first = cpu_seconds(os.getpid())
        engine_pid = child_running(proc.pid, "gateway.ingest.process")
        engine_at_first = cpu_seconds(engine_pid) if engine_pid else {}
        engine_at_done: dict[int, float] = {}
        if profile is not None:
            # Both processes: the engine stores and detects, the MQTT process reads,
            # answers and publishes what the engine wrote to the outbox.
            spies.append(_start_profiler(proc.pid, _named(profile, "mqtt"), profile_format))
            if engine_pid:
                spies.append(_start_profiler(engine_pid, _named(profile, "engine"), profile_format))
        cpu_at_done: dict[int, float] | None = None
        own_at_done: dict[int, float] = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited {proc.returncode}: "
                    f"{(workdir / 'gateway.log').read_text(errors='replace')[-3000:]}"
                )
            if acks.done_at is not None:
                if cpu_at_done is None:
                    cpu_at_done = cpu_seconds(proc.pid)
                    own_at_done = cpu_seconds(os.getpid())
                    engine_at_done = cpu_seconds(engine_pid) if engine_pid else {}
                    if receiver is not None:
                        webhooks["at_done"] = _webhook_counts(db, receiver)
                rows = _rows(db)
                if rows >= n:
                    break
            time.sleep(0.25)
        rows = _rows(db)
        if acks.done_at is None or rows < n:
            raise RuntimeError(
                f"gateway: {len(acks.stored)} of {n} answered stored, {rows} rows, "
                f"before the {timeout_s:.0f} s timeout"
            )
        if receiver is not None:
            webhooks.update(_catch_up(db, receiver, done_at=acks.done_at, limit_s=timeout_s))
        detection = _detection_catch_up(db, acks.done_at, deadline)
        series = scrape(metrics_port)
        rss = {
            "mqtt": memory_mib(proc.pid, "VmHWM"),
            "engine": memory_mib(engine_pid or -1, "VmHWM"),
        }
        with contextlib.closing(sqlite3.connect(db)) as conn:
            first_us, last_us, distinct = conn.execute(
                "select min(received_at), max(stored_at), count(distinct op_id) from sync_log"
            ).fetchone()
    finally:
        for spy in spies:
            end_process(spy, signal.SIGINT)
        end_process(proc)
        out.close()
        acks.close()
        notify.close()
    left = leftover(port, client_id)
    done_at = acks.done_at
    first = first_us / 1e6
    extra: dict[str, Any] = {
        "rows": rows,
        "distinct_op_ids": distinct,
        "answered_stored": len(acks.stored),
        "answered_other": acks.other,
        "ack_messages": acks.messages,
        "left_queued_after": len(left),
        "last_commit_after_first_receive_s": round(last_us / 1e6 - first, 3),
        "exit_code": proc.returncode,
        **detection,
        "commits": series.get("fieldgate_commit_seconds_count"),
        "commit_s_total": round(series.get("fieldgate_commit_seconds_sum", 0.0), 3),
        "commit_batch_mean": round(
            series.get("fieldgate_commit_batch_messages_sum", 0.0)
            / max(1.0, series.get("fieldgate_commit_batch_messages_count", 0.0)),
            1,
        ),
        "cpu_s": cpu_delta(proc.pid, cpu_at_first, cpu_at_done or cpu_at_first),
        "engine_cpu_s": cpu_delta(engine_pid or -1, engine_at_first, engine_at_done),
        "peak_rss_mib": rss,
        "engine_held_bytes_max": series.get("fieldgate_engine_held_bytes_max"),
        "scored": series.get("fieldgate_ml_scored_ops_total"),
        "hints": series.get("fieldgate_ml_hints_total"),
        "benchmark_cpu_s": round(
            sum(cpu_delta(os.getpid(), own_at_first, own_at_done or own_at_first).values()), 2
        ),
    }
    if webhooks:
        extra["webhooks"] = webhooks
    if acks.first_at is not None and done_at > acks.first_at:
        # Steady state: what a start costs (the engine loading a model, say) is before it.
        extra["rate_from_first_answer"] = round(n / (done_at - acks.first_at), 1)
    if notify.ready_at is not None:
        extra["from_ready_s"] = round(done_at - notify.ready_at, 3)
        extra["rate_from_ready"] = round(n / (done_at - notify.ready_at), 1)
    # Every operation judged too: the rate if the drain waited for detection.
    judged_s = done_at - first + detection["detection_caught_up_after_s"]
    extra["rate_judged"] = round(n / judged_s, 1)
    if distinct != n:
        raise RuntimeError(f"gateway: {distinct} distinct op_ids stored, not {n}")
    if left:
        # Stored and answered, but never PUBACKed: the broker would deliver them
        # again (as duplicates) on the next start.
        log(f"gateway: WARNING: {len(left)} messages left unacknowledged at the broker")
    return Drain(
        "gateway",
        n,
        rows,
        done_at - first,
        "first row's received_at -> last op_id answered stored",
        extra,
    )


def _detection_catch_up(db: Path, done_at: float, deadline: float) -> dict[str, Any]:
    """Conflict detection judges after the ack: how many operations it had yet to judge
    at the last answer, and how long after that answer it had judged them all, with the
    conflicts and messages it wrote (docs/decisions/0018-detection-after-the-ack.md)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (waiting,) = conn.execute(WAITING_SQL).fetchone()
        left = waiting
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            (left,) = conn.execute(WAITING_SQL).fetchone()
        caught_up_at = time.time()  # the ack counter's clock
        (conflicts,) = conn.execute("select count(*) from conflicts").fetchone()
        (messages,) = conn.execute("select count(*) from outbox where channel = 'mqtt'").fetchone()
    return {
        "detection_waiting_at_done": waiting,
        "detection_caught_up_after_s": round(max(0.0, caught_up_at - done_at), 2),
        "conflict_records": conflicts,
        "conflict_outbox_rows": messages,
    }


def _named(path: Path, process: str) -> Path:
    """out.3.txt -> out.3.engine.txt: one profile per process and drain."""
    return path.with_suffix(f".{process}{path.suffix}")


def _start_profiler(pid: int, path: Path, fmt: str) -> subprocess.Popen[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [py_spy, "record", "--pid", str(pid), "-o", str(path), "--format", fmt]
    cmd += ["--rate", "100", "--nonblocking", "--threads"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the run ------------------------------------------------------------------


def backlog(
    n: int, devices: int, seed: int, device_meta_share: float, clock: str = "paced"
) -> list[tuple[str, bytes]]:
    """N single operations, unique op_ids, from `devices` devices.

    `paced`: edited at the generator's pace (`payloads_per_s`, the fleet's), ending
    now: the backlog of a real outage, whose edits span hours, so that conflicts
    are as frequent as crews make them. `live`: every edit stamped as generated,
    all N within a few seconds: every edit of an entity concurrent with the others,
    a conflict storm rather than a backlog (kept to measure that worst case).
    """
    options = GeneratorOptions(
        devices=devices,
        seed=seed,
        max_ops=n,
        batch_share=0.0,
        malformed_share=0.0,
        duplicate_share=0.0,
        conflict_share=0.1,
        device_meta_share=device_meta_share,
    )
    now_us = time.time_ns() // 1000
    if clock == "live":
        made = generate(options, clock=lambda: time.time_ns() // 1000)
    else:
        span_us = int(n / options.payloads_per_s * 1_000_000)
        made = generate(dataclasses.replace(options, start_us=now_us - span_us))
    return [(p.device_id, p.body) for p in made]


def run_one(
    variant: str,
    messages: Sequence[tuple[str, bytes]],
    args: argparse.Namespace,
    base: Path,
    index: int,
    receive_maximum: int,
) -> Drain:
    tag = f"{variant}{index}-{uuid.uuid4().hex[:6]}"
    workdir = base / tag
    workdir.mkdir(parents=True)
    root = f"bench{uuid.uuid4().hex[:6]}"
    client_id = f"bench-{tag}"
    n = len(messages)
    # Saved on a clean stop; not every second (that would rewrite the whole
    # backlog during the drain and time the disk, not the drain).
    broker = Mosquitto(workdir / "mosquitto", autosave_interval=3600).start()
    try:
        create_session(broker.port, client_id, f"{root}/devices/+/sync")
        took = publish_backlog(broker.port, root, messages)
        log(f"{variant} #{index + 1}: {n} messages queued in {took:.1f} s; draining")
        assert broker.proc is not None
        broker_before = cpu_seconds(broker.proc.pid)
        if variant == "bare":
            result = drain_bare(broker.port, client_id, n, receive_maximum, args.timeout)
        elif variant == "naive":
            db = workdir / "naive.db"
            result = drain_naive(broker.port, client_id, n, receive_maximum, args.timeout, db)
        else:
            profile = None
            if args.profile is not None:
                suffix = f".{variant}.{index + 1}{Path(args.profile).suffix}"
                profile = Path(args.profile).with_suffix(suffix)
            env = dict(kv.split("=", 1) for kv in args.gateway_env)
            if variant == "gateway-off":
                env["FIELDGATE_CONFLICTS__ENABLED"] = "false"
            if variant == MODEL_VARIANT:
                scoring_model.install(workdir / "bench.db", args.model)
            receiver = args.receiver if variant == WEBHOOK_VARIANT else None
            if receiver is not None:
                env["FIELDGATE_WEBHOOKS"] = json.dumps(
                    [
                        {
                            "name": f"bench-{i + 1}",
                            "url": f"{receiver.url}/bench-{i + 1}",
                            "events": ["*"],
                            "secret": WEBHOOK_SECRET,
                        }
                        for i in range(args.webhooks)
                    ]
                )
                env["FIELDGATE_REDIS__URL"] = args.redis
            result = drain_gateway(
                broker.port,
                root,
                client_id,
                n,
                args.timeout,
                workdir,
                profile,
                args.profile_format,
                env,
                receiver,
            )
        cpu = result.extra.get("cpu_s", {})
        result.extra["cpu_us_per_msg"] = {
            k: round(v / n * 1e6, 1) for k, v in cpu.items() if isinstance(v, float)
        }
        engine_cpu = result.extra.get("engine_cpu_s")
        if engine_cpu:
            result.extra["engine_cpu_us_per_msg"] = round(sum(engine_cpu.values()) / n * 1e6, 1)
        result.extra["publish_s"] = round(took, 2)
        broker_cpu = cpu_delta(broker.proc.pid, broker_before, cpu_seconds(broker.proc.pid))
        result.extra["broker_cpu_s"] = round(sum(broker_cpu.values()), 2)
        log(f"{variant} #{index + 1}: {result.rate:,.0f} msg/s ({result.seconds:.2f} s)")
        return result
    finally:
        broker.stop(30, kill=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": (mosquitto.stdout.splitlines() or ["?"])[0].removeprefix("mosquitto version "),
        "paho-mqtt": version("paho-mqtt"),
        "aiomqtt": version("aiomqtt"),
        "uvloop": version("uvloop"),
        "msgspec": version("msgspec"),
        "sqlalchemy": version("sqlalchemy"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drain", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--clock",
        choices=("paced", "live"),
        default="paced",
        help="edit times: at the fleet's pace, ending now (a real backlog), or all"
        " within seconds (a conflict storm) [default: paced]",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated: {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--device-meta-share", type=float, default=0.0, help="share of ops with `device` metadata"
    )
    parser.add_argument("--timeout", type=float, default=0.0, help="per drain [default: scaled]")
    parser.add_argument(
        "--profile", help="py-spy output for each gateway drain, one file per process (path)"
    )
    parser.add_argument("--profile-format", default="flamegraph", help="flamegraph, raw, ...")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the gateway (repeatable), e.g. FIELDGATE_WRITER__MAX_WAIT_MS=5",
    )
    parser.add_argument(
        "--webhooks",
        type=int,
        default=0,
        metavar="N",
        help=f"N endpoints for the variant {WEBHOOK_VARIANT} (without --variants: run"
        f" gateway,{WEBHOOK_VARIANT})",
    )
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/15", help="for the webhooks' dead letters"
    )
    parser.add_argument(
        "--scoring",
        action="store_true",
        help=f"add the variant {MODEL_VARIANT} (without --variants: run gateway,{MODEL_VARIANT})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    explicit = any(a == "--variants" or a.startswith("--variants=") for a in (argv or sys.argv))
    if args.webhooks and not explicit:
        args.variants = f"gateway,{WEBHOOK_VARIANT}"
    if args.scoring and not explicit:
        args.variants = f"gateway,{MODEL_VARIANT}"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = set(VARIANTS)
    if args.webhooks > 0:
        known.add(WEBHOOK_VARIANT)
    if args.scoring:
        known.add(MODEL_VARIANT)
    unknown = set(variants) - known
    if unknown or args.messages < 1 or args.repeat < 1:
        parser.error(f"bad arguments (unknown variants: {sorted(unknown)})")
    if not args.timeout:
        args.timeout = max(120.0, args.messages / 200)
    receive_maximum = load_config(CONFIG).mqtt.receive_maximum

    log(f"making {args.messages} operations from {args.devices} devices")
    messages = backlog(args.messages, args.devices, args.seed, args.device_meta_share, args.clock)
    sizes = sorted(len(body) for _, body in messages)
    base = Path(tempfile.mkdtemp(prefix="fieldgate-drain-"))
    args.model = None
    if MODEL_VARIANT in variants:
        log("training the model the gateway-model variant scores with")
        args.model = scoring_model.prepare(base / "model")
    results: dict[str, list[Drain]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        args.receiver = None
        if WEBHOOK_VARIANT in variants:
            args.receiver = stack.enter_context(ReceiverProcess(log=base / "receiver.log"))
        try:
            for index in range(args.repeat):
                for variant in variants:
                    results[variant].append(
                        run_one(variant, messages, args, base, index, receive_maximum)
                    )
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)

    medians = {v: statistics.median(d.rate for d in runs) for v, runs in results.items()}
    report: dict[str, Any] = {
        "machine": machine(),
        "messages": args.messages,
        "repeat": args.repeat,
        "payload_bytes": {
            "mean": round(sum(sizes) / len(sizes), 1),
            "median": sizes[len(sizes) // 2],
        },
        "receive_maximum": receive_maximum,
        "gateway_env": args.gateway_env,
        "webhooks": args.webhooks,
        "median_rate": {v: round(r, 1) for v, r in medians.items()},
        "runs": {
            v: [
                {
                    "rate": round(d.rate, 1),
                    "seconds": round(d.seconds, 3),
                    "timed_from": d.timed_from,
                    **d.extra,
                }
                for d in runs
            ]
            for v, runs in results.items()
        },
    }
    if "gateway" in medians:
        if "bare" in medians:
            report["gateway_over_ceiling"] = round(medians["gateway"] / medians["bare"], 3)
        if "naive" in medians:
            report["gateway_over_naive"] = round(medians["gateway"] / medians["naive"], 2)
        if "gateway-off" in medians:
            report["detection_on_over_off"] = round(medians["gateway"] / medians["gateway-off"], 3)
            judged = statistics.median(r.extra["rate_judged"] for r in results["gateway"])
            report["judged_rate"] = round(judged, 1)
            report["judged_over_off"] = round(judged / medians["gateway-off"], 3)
        if WEBHOOK_VARIANT in medians:
            report["webhooks_over_without"] = round(
                medians[WEBHOOK_VARIANT] / medians["gateway"], 3
            )
        if MODEL_VARIANT in medians:
            report["scoring_over_without"] = round(medians[MODEL_VARIANT] / medians["gateway"], 3)
            steady = {
                v: statistics.median(d.extra.get("rate_from_first_answer", 0.0) for d in results[v])
                for v in ("gateway", MODEL_VARIANT)
            }
            if steady["gateway"]:
                report["scoring_over_without_steady"] = round(
                    steady[MODEL_VARIANT] / steady["gateway"], 3
                )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_text(report))
    return 0


def _text(report: dict[str, Any]) -> str:
    m = report["machine"]
    w = max(12, *(len(v) + 1 for v in report["runs"]))
    lines = [
        f"{report['messages']} messages (mean {report['payload_bytes']['mean']} B), "
        f"QoS 1, {report['repeat']} run(s) each, medians; "
        f"{m['nproc']} CPUs {m['cpu']}, Python {m['python']}, Mosquitto {m['mosquitto']}",
        "",
        f"{'variant':<{w}}{'msg/s':>10}   runs            timed from",
    ]
    for variant, runs in report["runs"].items():
        each = ", ".join(f"{r['rate']:,.0f}" for r in runs)
        lines.append(
            f"{variant:<{w}}{report['median_rate'][variant]:>10,.0f}   {each:<15} "
            f"{runs[0]['timed_from']}"
        )
        if variant.startswith("gateway"):
            ready = [r.get("rate_from_ready") for r in runs if r.get("rate_from_ready")]
            if ready:
                lines.append(
                    f"{'':<{w}}{statistics.median(ready):>10,.0f}"
                    "   (from READY=1 to the last answer)"
                )
    lines.append("")
    for variant, runs in report["runs"].items():
        for r in runs:
            cpu = r.get("cpu_s", {})
            detail = (
                f"{variant:<{w}}{r['seconds']:>8.2f} s  "
                f"CPU main thread {cpu.get('main', 0):.2f} s, "
                f"other threads {cpu.get('threads', 0):.2f} s, "
                f"broker {r.get('broker_cpu_s', 0):.2f} s"
            )
            if variant.startswith("gateway"):
                engine_cpu = sum(r.get("engine_cpu_s", {}).values())
                rss = r.get("peak_rss_mib", {})
                held = r.get("engine_held_bytes_max") or 0
                detail += (
                    f", engine process {engine_cpu:.2f} s"
                    f"; {r.get('commits', 0):.0f} commits of {r.get('commit_batch_mean', 0):.0f} "
                    f"messages, {r.get('commit_s_total', 0):.2f} s in commit; "
                    f"{r.get('left_queued_after', 0)} left unacked; peak RSS MQTT "
                    f"{rss.get('mqtt')} MiB, engine {rss.get('engine')} MiB; channel high "
                    f"water {held / 2**20:.1f} MiB; detection: "
                    f"{r.get('detection_waiting_at_done', 0)} ops to judge at the last answer, "
                    f"judged {r.get('detection_caught_up_after_s', 0):.2f} s after it, "
                    f"{r.get('conflict_records', 0)} conflicts, "
                    f"{r.get('conflict_outbox_rows', 0)} outbox rows"
                )
            lines.append(detail)
    cpu_main = {
        v: statistics.median(r["cpu_us_per_msg"].get("main", 0.0) for r in runs)
        for v, runs in report["runs"].items()
    }
    lines.append(
        "\nCPU per message, main thread (median): "
        + ", ".join(f"{v} {us:.0f} us" for v, us in cpu_main.items())
    )
    per_process = {
        v: (
            statistics.median(sum(r["cpu_us_per_msg"].values()) for r in runs),
            statistics.median(r.get("engine_cpu_us_per_msg", 0.0) for r in runs),
        )
        for v, runs in report["runs"].items()
        if v.startswith("gateway")
    }
    for v, (mqtt_us, engine_us) in per_process.items():
        lines.append(
            f"CPU per message, {v} (median): MQTT process {mqtt_us:.0f} us,"
            f" engine process {engine_us:.0f} us"
        )
    if "gateway_over_ceiling" in report:
        lines.append(f"\ngateway / ceiling (bare paho): {report['gateway_over_ceiling']:.2f}")
    if "gateway_over_naive" in report:
        lines.append(f"gateway / naive baseline:      {report['gateway_over_naive']:.1f}x")
    if "detection_on_over_off" in report:
        lines.append(f"detection on / off:            {report['detection_on_over_off']:.2f}")
        lines.append(
            f"  up to the last operation judged (detection after the ack): "
            f"{report['judged_rate']:,.0f} msg/s, {report['judged_over_off']:.2f} of off"
        )
    for r in report["runs"].get(WEBHOOK_VARIANT, []):
        hooks = r.get("webhooks", {})
        done, end = hooks.get("at_done", {}), hooks.get("at_end", {})
        lines.append(
            f"{WEBHOOK_VARIANT}: at the last answer {done.get('events', 0):,} events written,"
            f" {done.get('fanned_out', 0):,} fanned out, {done.get('received', 0):,}"
            f" deliveries received, {done.get('deliveries_waiting', 0):,} waiting; all"
            f" {end.get('received', 0):,} delivered {hooks.get('caught_up_after_s')} s after"
            f" it ({end.get('deliveries_dead', 0)} dead)"
        )
    if "webhooks_over_without" in report:
        lines.append(
            f"with {report['webhooks']} webhook endpoints / without:"
            f" {report['webhooks_over_without']:.2f} (target >= 0.9)"
        )
    for r in report["runs"].get(MODEL_VARIANT, []):
        lines.append(
            f"{MODEL_VARIANT}: {r.get('scored') or 0:,.0f} operations scored,"
            f" {r.get('hints') or 0:,.0f} hints"
        )
    if "scoring_over_without" in report:
        lines.append(
            f"with a model active / without: {report['scoring_over_without']:.2f}"
            " (target >= 0.85); from the first answer on (the model loaded):"
            f" {report.get('scoring_over_without_steady', 0):.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
