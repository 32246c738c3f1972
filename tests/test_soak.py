"""The soak (issue 15, item 6): a daemon's ordinary life at 2,000 sync operations a
second for half an hour, sampled every 10 s; nothing may grow past the warm-up, and
nothing may go missing.

Opt-in (`soak` marker, deselected by default):

    FIELDGATE_SOAK_OUT=docs/soak .venv/bin/pytest -m soak tests/test_soak.py

`FIELDGATE_SOAK_S` is the length of the load in seconds (1800; 180 tries it short),
`FIELDGATE_SOAK_RATE` the operations a second (2000), `FIELDGATE_SOAK_OUT` where the
figures go (`soak.csv`, `soak.png`, `soak.json`; the test's temp dir by default). They
are written before anything is asserted, so a failed run leaves its figures.

All real and all the test's own: a Mosquitto (persistence off: nothing restarts it),
a Redis for the dead-letter queue, the daemon (`make_daemon`, SQLite), a webhook
receiver subscribed to every event that answers 500 to every third request (by order
of arrival: 1 in 27 deliveries spends its three attempts and dies; never five failures
in a row, so the breaker stays shut and the failures reach the dead-letter queue
rather than pausing the endpoint), and a load generator in a process of its own: 100
devices on one MQTT connection, one operation a message, operation i due at t0 + i /
rate. 1% of the operations edit the status of one of 200 shared tasks from any
device (several devices editing the same entities: conflicts, detected and sent to
operators, devices and the webhook), the rest one of 200 tasks of the device's own.
Every 2 s an alert: a panic, a journal of mood 1 and stress 5 (both crises), one of
mood 3 (wellness), one of mood 8 (nothing). An operator (this test) acknowledges
every other crisis; the others are escalated twice, 20 s apart. Half-way, `ml/train`
fits the default model (a random forest, in the daemon's worker process) on the last
three minutes of the log at most: a fit on half an hour of it would outlast the run.

Settings changed for the run, and why: `conflicts.window_s` 30 (an operation is a
training label once its window closed: the run's own traffic is the history), the
escalation 20 s apart and twice (every crisis is done with within a minute of the
end), the webhook's retries 0, 1 and 2 s (every delivery is delivered or dead
within seconds of the end).

Sampled every 10 s into the CSV: the RSS, open file descriptors and CPU of both daemon
processes (`/proc`); the CPU of the devices' process, the broker and this test (all on
the same machine); the engine's commits in the window (how many, their mean size and
time: the daemon's metrics) and the size of SQLite's write-ahead log; the ack latency
percentiles over the window (from each operation handed to paho to its answer's
arrival, both in the devices' process, on one monotonic clock; over the answers that
arrived in the window); operations published and answered in the window, and
published but not yet answered; the MQTT outbox's depth and the webhook deliveries
waiting (the database); the dead-letter queue's size (Redis); whether the training
runs; the load average (the machine's other work).

Asserted at the end:

- **no growth beyond warm-up**: the first third of the run is the warm-up, and a
  daemon's first training run is a step of its own (it imports scikit-learn into the
  MQTT process: about 140 MiB, once); what follows the later of the two is cut in
  halves, and for the RSS and the open descriptors of each process, and the
  operations not yet answered (a daemon that falls behind is not in a steady state),
  the median of the second half is at most the median of the first plus 5% plus a
  slack (8 MiB of RSS, 4 descriptors, a second of operations), each half holding two
  samples at least. Latency is reported, not asserted: it follows the machine's
  other load, and on SQLite the log's growth (docs/operations.md, "Scaling out");
- **every operation stored once**: rows = distinct op_ids = operations published,
  versions 1..n per entity, every one answered `stored` once;
- **every alert stored and classified as sent, every crisis published** on
  `<root>/alerts/crisis`, each with the levels 0..its escalation in the database, the
  acknowledged ones acknowledged;
- **every webhook event delivered or dead**: the events of the outbox (`channel
  'webhook'`) are, as a multiset of (type, data), those of the webhook-ids the
  receiver answered 2xx and of the dead-letter entries in Redis, and no delivery
  waits;
- the training run ended `ready`, the engine never restarted, the daemon is healthy
  and logged nothing at warning or above but dead deliveries and escalations.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import (
    ROOT,
    Admin,
    Client,
    Daemon,
    Mosquitto,
    RedisServer,
    db_rows,
    free_port,
    iso,
    memory_mib,
    outbox_sent,
    require,
    sqlite_path,
    wait_for,
)
from tests.support.webhooks import Receiver, Reply, endpoint
from tests.test_metrics import scrape, value

SOAK_S = float(os.environ.get("FIELDGATE_SOAK_S", "1800"))
RATE = float(os.environ.get("FIELDGATE_SOAK_RATE", "2000"))
SAMPLE_S = 10.0
DEVICES = 100
OWN_TASKS = 200
"""Tasks of each device's own: all of them edited within the warm-up."""
SHARED_TASKS = 200
SHARED_SHARE = 0.01
STATUSES = ("in_progress", "done", "blocked")
ALERT_EVERY_S = 2.0
WINDOW_S = 30
ESCALATE_AFTER_S = 20
MAX_ESCALATIONS = 2
RETRIES = [0, 1, 2]
TRAIN_SPAN_S = 180
GROWTH = 0.05
GROWTH_SLACK = {
    "rss_mqtt_mb": 8.0,
    "rss_engine_mb": 8.0,
    "fds_mqtt": 4.0,
    "fds_engine": 4.0,
    "behind": RATE,
}
"""What each judged series may move by past 5%: an allocator's arena, a pooled
connection, a second of operations in flight."""
SETTLE_S = 180.0
"""After the load: the generator's last answers, the training, the last escalations
and deliveries, each given this long."""
WARNINGS_EXPECTED = frozenset({"webhook delivery dead", "crisis escalated"})

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(SOAK_S + 4 * SETTLE_S + 600))]


# -- the devices: a process of their own -------------------------------------------


@dataclass(frozen=True)
class Plan:
    port: int
    root: str
    tag: str
    rate: float
    duration_s: float
    settle_s: float

    @property
    def total(self) -> int:
        return round(self.rate * self.duration_s)

    @property
    def alerts(self) -> int:
        return int(self.duration_s // ALERT_EVERY_S)


def device_id(device: int) -> str:
    return f"dev-{device:03d}"


def alert_body(tag: str, k: int) -> tuple[str, dict[str, Any]]:
    """Alert k of the run: (device, payload), a panic, a crisis journal, a wellness
    journal and a plain one in turn."""
    device = (k * 7) % DEVICES
    body: dict[str, Any] = {
        "alert_id": f"{tag}-a{k}",
        "user_id": f"u-{device:03d}",
        "kind": "panic" if k % 4 == 0 else "journal",
        "occurred_at": iso(datetime.now(UTC), "milliseconds"),
    }
    body.update(({}, {"mood": 1, "stress": 5}, {"mood": 3, "stress": 2}, {"mood": 8})[k % 4])
    return device_id(device), body


def expected_class(k: int) -> str:
    return ("crisis", "crisis", "wellness", "none")[k % 4]


def acknowledged_by_operator(k: int) -> bool:
    """Every other crisis (k % 4 in 0, 1) is acknowledged at once; the others escalate."""
    return (k // 4) % 2 == 0


def ms_summary(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in ms of latencies in seconds (as benchmarks do)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3, 2)

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": round(ordered[-1] * 1e3, 2),
        "count": len(ordered),
    }


def generate(plan: Plan, conn: Connection) -> None:
    """The devices: publish the plan's operations and alerts on schedule, read every
    answer, and report each window's latencies when asked (`window`), then the whole
    run (`done`).

    One thread, paho without its network thread: `publish` writes the socket, and the
    wait for the next due time is paho's `loop(timeout)`, which reads the answers
    meanwhile; a generator that falls behind still reads every 50 operations.
    """
    import random

    rng = random.Random(plan.tag)
    prefix = f"{plan.tag}-"
    total = plan.total
    sent = array("d", bytes(8 * total))
    latency = array("f", [math.nan]) * total
    statuses: Counter[str] = Counter()
    alert_answers: dict[str, dict[str, Any]] = {}
    extra = {"repeated": 0, "unknown": 0, "publish_errors": 0}
    window: list[float] = []
    window_late: list[float] = []
    window_published = 0
    published = 0
    subscribed: list[int] = []

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        arrived = time.monotonic()
        body = json.loads(message.payload)
        if message.topic.endswith("/alerts/ack"):
            alert_answers[str(body["alert_id"])] = body
            return
        for result in body["results"]:
            op_id = str(result.get("op_id"))
            if not op_id.startswith(prefix):
                extra["unknown"] += 1
                continue
            index = int(op_id[len(prefix) :])
            if not math.isnan(latency[index]):
                extra["repeated"] += 1
                continue
            latency[index] = arrived - sent[index]
            window.append(arrived - sent[index])
            statuses[str(result["status"])] += 1

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{plan.tag}-devices", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(10000)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.append(1)
    client.connect("127.0.0.1", plan.port, clean_start=True)
    client.subscribe(
        [(f"{plan.root}/devices/+/sync/ack", 1), (f"{plan.root}/devices/+/alerts/ack", 1)]
    )
    deadline = time.monotonic() + 30
    while not subscribed and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    conn.send(("ready", bool(subscribed)))
    _, t0 = conn.recv()
    cpu0 = time.process_time()

    def serve() -> None:
        nonlocal window_published
        while conn.poll():
            conn.recv()
            report = ms_summary(window)
            report["published"] = window_published
            report["behind"] = published - sum(statuses.values())
            report["late_max_ms"] = round(max(window_late, default=0.0) * 1e3, 1)
            conn.send(("window", report))
            window.clear()
            window_late.clear()
            window_published = 0

    def wait_until(due: float) -> None:
        while (remaining := due - time.monotonic()) > 0:
            client.loop(timeout=remaining)

    next_alert = 0
    for index in range(total):
        due = t0 + index / plan.rate
        if index % 50 == 0:
            serve()
            client.loop(timeout=0)
        wait_until(due)
        device = index % DEVICES
        if rng.random() < SHARED_SHARE:
            entity = f"shared-{rng.randrange(SHARED_TASKS)}"
        else:
            entity = f"own-{device:03d}-{rng.randrange(OWN_TASKS)}"
        op = {
            "op_id": f"{prefix}{index}",
            "user_id": f"u-{device:03d}",
            "entity_type": "task",
            "entity_id": entity,
            "operation": "update",
            "changes": {"status": {"old": "open", "new": rng.choice(STATUSES)}},
            "edited_at": iso(datetime.now(UTC), "milliseconds"),
        }
        handed = time.monotonic()
        info = client.publish(f"{plan.root}/devices/{device_id(device)}/sync", json.dumps(op), 1)
        sent[index] = handed
        window_published += 1
        published += 1
        window_late.append(handed - due)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            extra["publish_errors"] += 1
        if next_alert < plan.alerts and handed >= t0 + (next_alert + 0.5) * ALERT_EVERY_S:
            device_name, body = alert_body(plan.tag, next_alert)
            info = client.publish(f"{plan.root}/devices/{device_name}/alerts", json.dumps(body), 1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                extra["publish_errors"] += 1
            next_alert += 1

    deadline = time.monotonic() + plan.settle_s
    while time.monotonic() < deadline and (
        sum(statuses.values()) < total or len(alert_answers) < next_alert
    ):
        serve()
        client.loop(timeout=0.05)
    serve()
    lat = [x for x in latency if not math.isnan(x)]
    thirds = [
        ms_summary([x for x in latency[total * k // 3 : total * (k + 1) // 3] if not math.isnan(x)])
        for k in range(3)
    ]
    unanswered = [f"{prefix}{i}" for i, x in enumerate(latency) if math.isnan(x)]
    conn.send(
        (
            "done",
            {
                "published": total,
                "answered": len(lat),
                "statuses": dict(statuses),
                "unanswered": len(unanswered),
                "unanswered_first": unanswered[:10],
                "alerts_sent": next_alert,
                "alert_answers": alert_answers,
                "latency_all": ms_summary(lat),
                "latency_thirds": thirds,
                "cpu_s": round(time.process_time() - cpu0, 1),
                **extra,
            },
        )
    )
    client.disconnect()


class Devices:
    """The generator's process, and the test's end of its pipe."""

    def __init__(self, plan: Plan) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=generate, args=(plan, child), daemon=True)

    def start(self) -> float:
        """Connected and subscribed; then go, the first operation due in 0.5 s: t0."""
        self.proc.start()
        _, subscribed = self.receive("ready", 60)
        assert subscribed, "the generator's subscription was not granted"
        t0 = time.monotonic() + 0.5
        self.conn.send(("go", t0))
        return t0

    def receive(self, kind: str, timeout: float) -> tuple[str, Any]:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the generator sent no {kind!r} within {timeout} s")
        message = cast(tuple[str, Any], self.conn.recv())
        assert message[0] == kind, message
        return message

    def window(self) -> dict[str, Any]:
        self.conn.send(("window",))
        report: dict[str, Any] = self.receive("window", 60)[1]
        return report

    def stop(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- what is sampled -----------------------------------------------------------------


def engine_of(pid: int) -> int | None:
    """The engine process: the daemon's child running `gateway.ingest.process` (the
    training worker and multiprocessing's tracker are its children too)."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"gateway.ingest.process" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
    return None


def rss_mb(pid: int | None) -> float:
    found = memory_mib(pid) if pid is not None else None
    return math.nan if found is None else found


def fds(pid: int | None) -> float:
    if pid is None:
        return math.nan
    with contextlib.suppress(OSError):
        return float(len(os.listdir(f"/proc/{pid}/fd")))
    return math.nan


TICK = os.sysconf("SC_CLK_TCK")


class Commits:
    """The engine's commits over each window, from the daemon's metrics: how many, their
    mean size and time (a daemon that falls behind with CPU to spare waits for its
    disk)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.last = (0.0, 0.0, 0.0)

    def window(self) -> dict[str, float]:
        samples = scrape(self.url)[1]
        now = (
            value(samples, "fieldgate_commit_seconds_count"),
            value(samples, "fieldgate_commit_seconds_sum"),
            value(samples, "fieldgate_commit_batch_messages_sum"),
        )
        commits, seconds, messages = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return {
            "commits": commits,
            "batch_mean": round(messages / commits, 1) if commits else math.nan,
            "commit_ms_mean": round(1e3 * seconds / commits, 2) if commits else math.nan,
        }


def wal_mb(url: str) -> float:
    """The size of SQLite's write-ahead log: a reader that holds a snapshot (a training
    run's extraction) keeps checkpoints from shortening it."""
    try:
        return round(os.path.getsize(sqlite_path(url) + "-wal") / 2**20, 1)
    except OSError:
        return math.nan


class Cpu:
    """A process's CPU over each window, in % of one core: a daemon that falls behind
    below 100% waits for a core the machine's other work holds."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[float, float]] = {}

    def percent(self, pid: int | None) -> float:
        if pid is None:
            return math.nan
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return math.nan
        fields = stat[stat.rindex(")") + 2 :].split()
        used, now = (int(fields[11]) + int(fields[12])) / TICK, time.monotonic()
        before = self.last.get(pid)
        self.last[pid] = (used, now)
        if before is None:
            return math.nan
        return round(100 * (used - before[0]) / (now - before[1]), 1)


def count(url: str, query: str) -> int:
    ((value,),) = db_rows(url, query)
    return int(value)


UNSENT_MQTT = "select count(*) from outbox where sent_at is null and channel = 'mqtt'"
WAITING = "select count(*) from webhook_deliveries"
DLQ_INDEX = "webhook:dlq:index"


COLUMNS = [
    "t_s",
    "rss_mqtt_mb",
    "rss_engine_mb",
    "fds_mqtt",
    "fds_engine",
    "cpu_mqtt_pct",
    "cpu_engine_pct",
    "cpu_devices_pct",
    "cpu_broker_pct",
    "cpu_test_pct",
    "commits",
    "batch_mean",
    "commit_ms_mean",
    "wal_mb",
    "published",
    "answered",
    "ack_p50_ms",
    "ack_p90_ms",
    "ack_p99_ms",
    "ack_max_ms",
    "late_max_ms",
    "behind",
    "outbox_depth",
    "webhook_waiting",
    "dlq_entries",
    "training",
    "loadavg_1m",
]


class Operator:
    """Watches `<root>/alerts/crisis` and acknowledges every other crisis as it comes."""

    def __init__(self, port: int, root: str, tag: str) -> None:
        self.root = root
        self.prefix = f"{tag}-a"
        self.client = Client(port).connect()
        self.client.subscribe(f"{root}/alerts/crisis")
        self.acked: set[str] = set()

    def crises(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.client.on(f"{self.root}/alerts/crisis")]

    def acknowledge(self) -> None:
        for crisis in self.crises():
            alert_id = crisis["alert_id"]
            k = int(alert_id.removeprefix(self.prefix))
            if alert_id not in self.acked and acknowledged_by_operator(k):
                self.client.publish(
                    f"{self.root}/alerts/crisis/ack",
                    {"alert_id": alert_id, "by": "soak-operator"},
                    wait=False,
                )
                self.acked.add(alert_id)

    def close(self) -> None:
        self.client.close()


# -- the figures ----------------------------------------------------------------------


def phases(samples: list[dict[str, Any]], training_s: tuple[float, float]) -> dict[str, Any]:
    """The samples of each phase of the run: the warm-up (the first third), then until
    the training run starts, then the two halves of what follows its end.

    Growth is judged on those two halves: the first training run of a daemon imports
    scikit-learn into its MQTT process (gateway/outbound/training.py), a step up in
    RSS once, which the phase before the training shows and which is not growth.
    """
    start, end = training_s
    warm_up = SOAK_S / 3
    after = [s for s in samples if s["t_s"] >= max(warm_up, end)]
    return {
        "warm_up": [s for s in samples if s["t_s"] < warm_up],
        "before_training": [s for s in samples if warm_up <= s["t_s"] < start],
        "after_training_early": after[: len(after) // 2],
        "after_training_late": after[len(after) // 2 :],
    }


def median(part: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in part if not math.isnan(s[key])]
    return round(statistics.median(values), 1) if values else None


PANELS: list[tuple[str, dict[str, str], bool]] = [
    ("RSS (MiB)", {"rss_mqtt_mb": "MQTT process", "rss_engine_mb": "engine"}, False),
    ("open fds", {"fds_mqtt": "MQTT process", "fds_engine": "engine"}, False),
    (
        "CPU (% of a core)",
        {
            "cpu_mqtt_pct": "MQTT process",
            "cpu_engine_pct": "engine",
            "cpu_devices_pct": "devices",
            "cpu_broker_pct": "broker",
            "cpu_test_pct": "test (receiver, operator)",
        },
        False,
    ),
    ("ack latency (ms)", {"ack_p50_ms": "p50", "ack_p90_ms": "p90", "ack_p99_ms": "p99"}, True),
    ("ops unanswered", {"behind": "published, not yet answered"}, False),
    (
        "commits",
        {
            "commit_ms_mean": "mean commit (ms)",
            "batch_mean": "mean batch (messages)",
            "wal_mb": "SQLite WAL (MiB)",
        },
        True,
    ),
    ("waiting", {"outbox_depth": "MQTT outbox", "webhook_waiting": "webhook"}, False),
    ("DLQ entries", {"dlq_entries": "Redis"}, False),
]
"""The PNG's panels: a title, the series drawn (CSV column: label), a log scale."""


def plot(samples: list[dict[str, Any]], training: tuple[float, float], path: Path) -> None:
    """Each panel against minutes; the warm-up shaded grey, the training run orange, the
    machine's load average on the CPU panel's right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(10, 18), sharex=True)
    for axis, (title, series, log) in zip(axes, PANELS, strict=True):
        for key, label in series.items():
            axis.plot(minutes, [s[key] for s in samples], label=label, linewidth=1.2)
        axis.set_ylabel(title)
        if log:
            axis.set_yscale("log")
        else:
            axis.set_ylim(bottom=0)
        axis.axvspan(0, SOAK_S / 180, color="grey", alpha=0.12)
        axis.axvspan(training[0] / 60, training[1] / 60, color="tab:orange", alpha=0.15)
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=7)
        if "cpu_engine_pct" in series:
            load = axis.twinx()
            load.plot(minutes, [s["loadavg_1m"] for s in samples], "k:", linewidth=1)
            load.set_ylabel("load average (dotted)")
            load.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes (grey: warm-up; orange: the training run)")
    figure.suptitle(f"fieldgate soak: {RATE:,.0f} ops/s for {SOAK_S / 60:g} min")
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def output_dir(tmp_path: Path) -> Path:
    named = os.environ.get("FIELDGATE_SOAK_OUT")
    out = (ROOT / named) if named else tmp_path / "soak"
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "commit": commit,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "at": iso(datetime.now(UTC), "seconds"),
    }


def canonical(event_type: str, data: Any) -> str:
    return json.dumps([event_type, data], sort_keys=True)


def dlq_entries(url: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        members = cast(list[str], r.zrange(DLQ_INDEX, 0, -1))
        raws = cast(list[str | None], r.mget([f"webhook:dlq:{m}" for m in members]))
    finally:
        r.close()
    assert None not in raws, "an index member without its entry"
    return [json.loads(cast(str, raw)) for raw in raws]


def dlq_size(url: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        return int(r.zcard(DLQ_INDEX))
    finally:
        r.close()


# -- the run --------------------------------------------------------------------------


@pytest.fixture
def soak_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require("mosquitto")
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    yield broker
    broker.stop(10, kill=True)


def answered(admin: Admin, transaction: str) -> bool:
    """Whether the long command `transaction` has its final answer (not `accepted`)."""
    return any(a["status"] != "accepted" for a in admin.answers("ml/train", transaction))


def fail_every_third(n: int) -> Reply:
    return Reply(500) if n % 3 == 2 else Reply()


def test_soak(
    tmp_path: Path,
    soak_broker: Mosquitto,
    own_redis: RedisServer,
    make_daemon: Callable[..., Daemon],
) -> None:
    out = output_dir(tmp_path)
    tag = f"soak{uuid.uuid4().hex[:6]}"
    at_start = machine()
    with Receiver(fail_every_third) as receiver:
        daemon = make_daemon(
            soak_broker.port,
            config_text=endpoint("soak", receiver.url, retry_schedule_s=RETRIES),
            REDIS__URL=own_redis.url,
            CONFLICTS__WINDOW_S=str(WINDOW_S),
            ALERTS__ESCALATE_AFTER_S=str(ESCALATE_AFTER_S),
            ALERTS__MAX_ESCALATIONS=str(MAX_ESCALATIONS),
            ML__MODELS_DIR=str(tmp_path / "models"),
            METRICS__LISTEN=f"127.0.0.1:{free_port()}",
        )
        try:
            outcome = run(daemon, soak_broker, own_redis, receiver, tag, out)
        finally:
            daemon.stop()
    outcome["machine"] = {"start": at_start, "end": machine()}
    written = outcome | {"alerts": alert_figures(outcome["alerts"])}
    (out / "soak.json").write_text(json.dumps(written, indent=2) + "\n")
    judge(outcome)


def alert_figures(alerts: dict[str, Any]) -> dict[str, Any]:
    """The alerts in numbers, for the figures (the judge reads each alert)."""
    stored = alerts["stored"].values()
    return {
        "sent": alerts["sent"],
        "stored": dict(Counter(classification for classification, _, _ in stored)),
        "crisis_messages": sum(len(v) for v in alerts["published_levels"].values()),
        "escalations": sum(escalation or 0 for _, escalation, _ in stored),
        "acknowledged_by_operator": len(alerts["operator_acked"]),
    }


def run(
    daemon: Daemon,
    broker: Mosquitto,
    redis_server: RedisServer,
    receiver: Receiver,
    tag: str,
    out: Path,
) -> dict[str, Any]:
    """The load, the samples and the training; then everything settled, and what each
    check reads, gathered into one record (written out before it is judged)."""
    assert daemon.proc is not None and broker.proc is not None
    pid, broker_pid = daemon.proc.pid, broker.proc.pid
    admin = Admin(Client(broker.port).connect(), daemon.root)
    operator = Operator(broker.port, daemon.root, tag)
    plan = Plan(broker.port, daemon.root, tag, RATE, SOAK_S, SETTLE_S)
    devices = Devices(plan)
    samples: list[dict[str, Any]] = []
    engines: set[int] = set()
    training_tx = None
    training = [math.nan, math.nan]
    cpu = Cpu()
    commits = Commits(f"http://{daemon.env['FIELDGATE_METRICS__LISTEN']}/metrics")
    try:
        t0 = devices.start()
        for process in (pid, devices.proc.pid, broker_pid, os.getpid()):
            cpu.percent(process)
        commits.window()
        for k in range(1, int(SOAK_S // SAMPLE_S) + 1):
            time.sleep(max(0.0, t0 + k * SAMPLE_S - time.monotonic()))
            engine = engine_of(pid)
            if engine is not None:
                engines.add(engine)
            window = devices.window()
            if training_tx is not None and math.isnan(training[1]) and answered(admin, training_tx):
                training[1] = time.monotonic() - t0
            samples.append(
                {
                    "t_s": round(time.monotonic() - t0, 1),
                    "rss_mqtt_mb": rss_mb(pid),
                    "rss_engine_mb": rss_mb(engine),
                    "fds_mqtt": fds(pid),
                    "fds_engine": fds(engine),
                    "cpu_mqtt_pct": cpu.percent(pid),
                    "cpu_engine_pct": cpu.percent(engine),
                    "cpu_devices_pct": cpu.percent(devices.proc.pid),
                    "cpu_broker_pct": cpu.percent(broker_pid),
                    "cpu_test_pct": cpu.percent(os.getpid()),
                    **commits.window(),
                    "wal_mb": wal_mb(daemon.db_url),
                    "published": window["published"],
                    "answered": window["count"],
                    "ack_p50_ms": window.get("p50", math.nan),
                    "ack_p90_ms": window.get("p90", math.nan),
                    "ack_p99_ms": window.get("p99", math.nan),
                    "ack_max_ms": window.get("max", math.nan),
                    "late_max_ms": window["late_max_ms"],
                    "behind": window["behind"],
                    "outbox_depth": count(daemon.db_url, UNSENT_MQTT),
                    "webhook_waiting": count(daemon.db_url, WAITING),
                    "dlq_entries": dlq_size(redis_server.url),
                    "training": int(training_tx is not None and math.isnan(training[1])),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
            )
            operator.acknowledge()
            if training_tx is None and k * SAMPLE_S >= SOAK_S / 2:
                since = datetime.now(UTC) - timedelta(seconds=TRAIN_SPAN_S)
                training_tx = admin.send("ml/train", {"since": iso(since, "milliseconds")})
                training[0] = time.monotonic() - t0
        with (out / "soak.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(samples)
        running_to = SOAK_S if math.isnan(training[1]) else training[1]
        plot(samples, (training[0], running_to), out / "soak.png")
        generated: dict[str, Any] = devices.receive("done", SETTLE_S + 60)[1]
        assert training_tx is not None
        trained = admin.answer("ml/train", training_tx, timeout=SETTLE_S)
        if math.isnan(training[1]):
            training[1] = time.monotonic() - t0
        # Then everything settles: the last escalations, their events, the deliveries.
        pending_escalations = "select count(*) from alerts where next_escalation_at is not null"
        operator.acknowledge()
        wait_for(lambda: count(daemon.db_url, pending_escalations) == 0, SETTLE_S, 1.0)
        unfanned = "select count(*) from outbox where channel = 'webhook' and sent_at is null"
        wait_for(
            lambda: count(daemon.db_url, unfanned) == 0 and count(daemon.db_url, WAITING) == 0,
            SETTLE_S,
            1.0,
        )
        wait_for(lambda: outbox_sent(daemon.db_url), SETTLE_S, 1.0)
        operator.client.fence()
        health = admin.data("health")
        stats = admin.data("stats")
        engines.add(engine_of(pid) or 0)
    finally:
        devices.stop()
        operator.close()
        admin.client.close()
    span = (training[0], training[1])
    return gather(
        daemon, redis_server, receiver, operator, tag, samples, generated, trained, health, span
    ) | {
        "stats": stats,
        "engine_pids": len(engines - {0}),
        "training_s": [round(x, 1) for x in span],
    }


def gather(
    daemon: Daemon,
    redis_server: RedisServer,
    receiver: Receiver,
    operator: Operator,
    tag: str,
    samples: list[dict[str, Any]],
    generated: dict[str, Any],
    trained: dict[str, Any],
    health: dict[str, Any],
    training_s: tuple[float, float],
) -> dict[str, Any]:
    url = daemon.db_url
    parts = phases(samples, training_s)
    ((rows, distinct),) = db_rows(url, "select count(*), count(distinct op_id) from sync_log")
    gaps = count(
        url,
        "select count(*) from (select entity_type, entity_id, count(*) as n, max(version) as v"
        " from sync_log group by entity_type, entity_id) as e where n != v or n < 1",
    )
    conflicts = db_rows(url, "select count(*), coalesce(sum(member_count), 0) from conflicts")[0]

    alerts = {
        alert_id: (classification, escalation, acknowledged_at is not None)
        for alert_id, classification, escalation, acknowledged_at in db_rows(
            url, "select alert_id, classification, escalation, acknowledged_at from alerts"
        )
    }
    published_levels: dict[str, set[int]] = {}
    for crisis in operator.crises():
        published_levels.setdefault(crisis["alert_id"], set()).add(crisis["escalation"])

    events = Counter(
        canonical(event_type, json.loads(payload))
        for event_type, payload in db_rows(
            url, "select event_type, payload from outbox where channel = 'webhook'"
        )
    )
    with receiver._lock:
        requests = list(receiver.requests)
    delivered = {
        r.msg_id: canonical(r.event["type"], r.event["data"])
        for n, r in enumerate(requests)
        if fail_every_third(n).status < 300
    }
    dead = {
        e["webhook_id"]: canonical(e["payload"]["type"], e["payload"]["data"])
        for e in dlq_entries(redis_server.url)
    }
    accounted = Counter({**delivered, **dead}.values())

    warnings = Counter(
        str(line.get("event"))
        for line in daemon.log_lines()
        if line.get("level") in ("warning", "error", "critical")
    )
    return {
        "tag": tag,
        "duration_s": SOAK_S,
        "rate": RATE,
        "samples": len(samples),
        "generated": {k: v for k, v in generated.items() if k != "alert_answers"},
        "sync_log": {"rows": rows, "distinct_op_ids": distinct, "entities_with_gaps": gaps},
        "conflicts": {"conflicts": conflicts[0], "members": conflicts[1]},
        "alerts": {
            "sent": generated["alerts_sent"],
            "answers": generated["alert_answers"],
            "stored": alerts,
            "published_levels": {k: sorted(v) for k, v in published_levels.items()},
            "operator_acked": sorted(operator.acked),
        },
        "webhooks": {
            "events": sum(events.values()),
            "requests": len(requests),
            "unverified": sum(not r.verified for r in requests),
            "delivered": len(delivered),
            "dead": len(dead),
            "delivered_and_dead": len(delivered.keys() & dead.keys()),
            "missing": sum((events - accounted).values()),
            "unknown": sum((accounted - events).values()),
            "by_type": dict(Counter(json.loads(e)[0] for e in events.elements())),
        },
        "growth": {
            key: {name: median(part, key) for name, part in parts.items()}
            for key in (*GROWTH_SLACK, "ack_p99_ms")
        },
        "phase_samples": {name: len(part) for name, part in parts.items()},
        "model": {k: trained.get("data", {}).get("model", {}).get(k) for k in MODEL_FIGURES}
        | {"answer_status": trained["status"]},
        "health": health,
        "log_warnings": dict(warnings),
    }


MODEL_FIGURES = ("model_id", "status", "train_rows", "holdout_rows", "holdout_positives")


def judge(outcome: dict[str, Any]) -> None:
    generated = outcome["generated"]
    total = generated["published"]
    # Every operation stored once and answered once.
    assert generated["publish_errors"] == 0, generated
    assert generated["unanswered"] == 0, generated
    assert generated["statuses"] == {"stored": total}, generated
    assert (generated["repeated"], generated["unknown"]) == (0, 0), generated
    assert outcome["sync_log"] == {
        "rows": total,
        "distinct_op_ids": total,
        "entities_with_gaps": 0,
    }
    assert outcome["conflicts"]["conflicts"] > 0, outcome["conflicts"]

    # Every alert stored as classified; every crisis published, with each of its levels.
    alerts = outcome["alerts"]
    stored = alerts["stored"]
    assert len(stored) == alerts["sent"]
    for k in range(alerts["sent"]):
        alert_id = f"{outcome['tag']}-a{k}"
        classification, escalation, acknowledged = stored[alert_id]
        assert classification == expected_class(k), (alert_id, classification)
        assert alerts["answers"][alert_id]["status"] == "stored", alerts["answers"][alert_id]
        if classification == "crisis":
            levels = alerts["published_levels"].get(alert_id, [])
            assert levels == list(range(escalation + 1)), (alert_id, levels, escalation)
            assert acknowledged == (alert_id in alerts["operator_acked"]), alert_id
        else:
            assert alert_id not in alerts["published_levels"], alert_id

    # Every webhook event delivered or dead, each signed.
    hooks = outcome["webhooks"]
    assert hooks["events"] > 0, hooks
    # 1 in 27 dies: of 500 events, none dead has a chance below 1e-7 (a short try at a
    # low rate may have too few events to tell).
    assert hooks["dead"] > 0 or hooks["events"] < 500, hooks
    assert (hooks["missing"], hooks["unknown"], hooks["unverified"]) == (0, 0, 0), hooks

    # The training run, the engine, the daemon's health and log.
    assert outcome["model"]["status"] == "ready", outcome["model"]
    assert outcome["engine_pids"] == 1, "the engine process was restarted"
    assert outcome["health"]["healthy"], outcome["health"]
    assert set(outcome["log_warnings"]) <= WARNINGS_EXPECTED, outcome["log_warnings"]

    # No growth beyond the warm-up (and the training run's step).
    assert min(outcome["phase_samples"].values()) >= 2, outcome["phase_samples"]
    growth = outcome["growth"]
    for key, slack in GROWTH_SLACK.items():
        early, late = growth[key]["after_training_early"], growth[key]["after_training_late"]
        assert late <= early * (1 + GROWTH) + slack, (key, growth[key])
