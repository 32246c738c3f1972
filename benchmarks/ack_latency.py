"""Sync ack latency at a steady load: p50 and p99, before and after a change, in one run.

The issue's target: at a steady 2,000 sync operations a second from 50 devices,
the p99 of the ack latency is at most 20 ms.

    .venv/bin/python -m benchmarks.ack_latency --before /work/before12
        [--rate 2000] [--devices 50] [--duration 20] [--warmup 3] [--repeat 3]
        [--publishers 2] [--entities 1000000] [--settle 10] [--json] [--keep]

A short check: `--duration 5 --repeat 1`. Run it with the virtualenv's python
from the repository's root (`sys.executable` starts the daemons).

What runs: one test-owned Mosquitto (`tests.support.Mosquitto`: free port,
persistence off) for the whole run; for each variant and repetition, a fresh
gateway daemon on a fresh SQLite database in a temp dir, with the checkout's
shipped config (`config/fieldgate.toml`: conflict detection on, writer max_wait
1 ms) and the environment of `tests.support.daemon_env` (own topic root and
client id, log format json, level warning) plus a metrics port. Variants
alternate, before, after, before, after, ..., so that a machine that gets busier
or quieter during the run weighs on both alike.

- `after`: the code of this checkout (`--after`, default the repository this
  file is in), as it is on disk when each daemon starts: uncommitted edits
  included. The report gives each checkout's commit and whether its packages or
  config differ from it; for figures to keep, point `--after` at a clean
  worktree of the commit.
- `before`: the code of another checkout (`--before DIR`, e.g. a git worktree of
  the previous commit). Without it, only `after` runs.

Each daemon is `[sys.executable, "-m", "gateway", "run", "--config", ...]` with
its cwd set to the checkout: `python -m` puts the cwd first on sys.path, ahead of
the virtualenv's editable install of fieldgate (its finder is on `sys.meta_path`
after the path finder), so the checkout's own `gateway` (and `storage`,
`handlers`) packages are imported, and so are they in the engine process that
`after` starts (`python -m gateway.ingest.process`, same cwd). Checked, not
assumed: `python -v -m gateway --help` in each checkout must load
`<checkout>/gateway/__init__.py` (else the run stops before it starts), and each
daemon's /proc/<pid>/cwd must be its checkout. The daemon is ready when it says
READY=1 on a `$NOTIFY_SOCKET` of the benchmark's (`tests.support.NotifySocket`):
its "ready" log line is at info, below the level used here.

The load: `--publishers` processes, each one paho client (MQTT v5, QoS 1) on a
single thread, publishing for a share of the devices (`dev-00` .. `dev-49`)
on `<root>/devices/<device_id>/sync`, one operation a message. Operation i of
the run is due at t0 + i / rate and comes from device i mod devices, published
by process i mod publishers, which waits for the absolute due time in paho's
`loop(timeout)` (reading its PUBACKs meanwhile) and, when late, publishes at
once: the merged stream is evenly spaced, and how late each op was handed to
paho is reported. Operations are like `tests.support.sync_op`: a unique op_id, a
task drawn at random among `--entities` (default 1,000,000: over the 46,000 ops
of a default run, some 700 conflicts, rare but present), `status` set to one of
three values, `edited_at` now in RFC 3339 UTC, user `u-<device>`.

The latency of an operation: the time its answer arrives at a subscriber on
`<root>/devices/+/sync/ack` (QoS 1, in the benchmark's own process, whose garbage
collector is off while the load runs, so that its pauses are not counted; results
taken from each message by `tests.support.results_of`, so one ack message may
answer several ops) minus the time its publisher handed it to paho. Both are
`time.monotonic()`, which on Linux is one system-wide clock (CLOCK_MONOTONIC):
times taken in the publisher processes and in the benchmark's compare. It covers
device -> broker -> gateway (parse, group commit with its fsync, conflict
detection, the engine hop in `after`) -> broker -> device.

Per run: p50, p90, p99, max, mean and count over the operations after the
warm-up (the first `--warmup` seconds of operations are left out); answers by
status (every op is expected `stored`) and the ops with no answer within
`--settle` s of the last publish (left out of the percentiles, which are then a
lower bound; the gateway's and its engine's stacks are then dumped with py-spy
into the run's dir, which is kept); the achieved rate (ops handed to paho over
the measured span) and the publishers' lateness; the CPU (user + system,
/proc/<pid>/stat) over the measured window, per measured op, of the gateway
process and, for `after`, of its children (the engine:
/proc/<pid>/task/*/children), of the broker and of the benchmark's subscriber,
and the publishers' own; commits, their mean batch size and duration (the
daemon's metrics, whole run); rows stored and conflicts detected. Summary: the
median over the repetitions of each variant's p50 and p99, the after / before
ratios, and whether the `after` p99 median meets the target.

Figures are only as good as the machine is quiet: the load average at the start
of each run is reported, and the publishers and the subscriber share the CPUs
with the daemon and the broker (their CPU per op is reported for that reason).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.drain import children, machine, scrape
from tests.support import (
    ROOT,
    Client,
    Mosquitto,
    NotifySocket,
    Received,
    daemon_env,
    end_process,
    free_port,
    results_of,
    wait_for,
)

TARGET_P99_MS = 20.0
STATUSES = ("in_progress", "done", "blocked")
_TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[ack_latency {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank on the sorted values (as benchmarks.crisis_latency)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "p50": round(percentile(values, 50), 2),
        "p90": round(percentile(values, 90), 2),
        "p99": round(percentile(values, 99), 2),
        "max": round(max(values), 2),
        "mean": round(statistics.fmean(values), 2),
        "count": len(values),
    }


# -- the load -------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rate: float
    devices: int
    duration_s: float
    warmup_s: float
    entities: int
    publishers: int
    seed: int
    device_prefix: str = "dev"
    """Device ids are `<prefix>-00`, `<prefix>-01`, ...: another prefix, other devices
    (benchmarks.flood's flooder)."""

    @property
    def total(self) -> int:
        return round(self.rate * (self.warmup_s + self.duration_s))

    @property
    def warmup_ops(self) -> int:
        return round(self.rate * self.warmup_s)

    def device_id(self, device: int) -> str:
        return f"{self.device_prefix}-{device:0{max(2, len(str(self.devices - 1)))}d}"


def op_id(tag: str, index: int) -> str:
    return f"{tag}-{index}"


def _publisher(
    port: int,
    root: str,
    tag: str,
    me: int,
    load: Load,
    start: Any,
    go: Any,
    abort: Any,
    out: Any,
) -> None:
    """One publisher process: the operations i = me, me + publishers, ... of the run,
    each handed to paho at t0 + i / rate; sends back when it handed each one.

    One thread, no paho network thread: `publish` writes the socket itself, and the
    wait until the next due time is paho's `loop(timeout)` (a select that reads the
    PUBACKs as they come), which costs less CPU than a second thread woken for each
    message, on a machine the daemon shares.
    """
    rng = random.Random(f"{load.seed}-{me}")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{tag}-pub{me}", protocol=mqtt.MQTTv5
    )
    client.max_inflight_messages_set(10000)
    client.max_queued_messages_set(0)
    pubacks = 0
    connected = False

    def on_publish(*_a: Any) -> None:
        nonlocal pubacks
        pubacks += 1

    def on_connect(*_a: Any) -> None:
        nonlocal connected
        connected = True

    client.on_publish = on_publish
    client.on_connect = on_connect
    client.connect("127.0.0.1", port, clean_start=True)
    sent = array("d")
    refused = 0
    lost = 0

    def loop_until(deadline: float) -> None:
        nonlocal lost
        while (remaining := deadline - time.monotonic()) > 0:
            if client.loop(timeout=remaining) != mqtt.MQTT_ERR_SUCCESS:
                lost += 1
                time.sleep(min(remaining, 0.01))

    try:
        deadline = time.monotonic() + 10
        while not connected and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        if not connected:
            raise RuntimeError(f"publisher {me} could not connect")
        out.put(("ready", me))
        while not go.is_set():
            if abort.is_set():
                return
            client.loop(timeout=0.05)  # keepalive while the others connect
        t0 = float(start.value)
        cpu0 = time.process_time()
        for i in range(me, load.total, load.publishers):
            if abort.is_set():
                return
            device = i % load.devices
            op = {
                "op_id": op_id(tag, i),
                "user_id": f"u-{device:02d}",
                "entity_type": "task",
                "entity_id": f"t{rng.randrange(load.entities)}",
                "operation": "update",
                "changes": {"status": {"old": "open", "new": rng.choice(STATUSES)}},
                "edited_at": datetime.now(UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
            }
            body = json.dumps(op)
            topic = f"{root}/devices/{load.device_id(device)}/sync"
            loop_until(t0 + i / load.rate)
            handed = time.monotonic()
            info = client.publish(topic, body, qos=1)
            sent.append(handed)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                refused += 1
        cpu = time.process_time() - cpu0
        deadline = time.monotonic() + 30
        while pubacks < len(sent) and time.monotonic() < deadline:
            client.loop(timeout=0.05)
        out.put(("done", me, sent.tobytes(), refused + lost, pubacks, cpu))
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()


class Publishers:
    """`load.publishers` processes (spawned: the benchmark's own threads and GIL are
    not theirs), started together at one t0."""

    def __init__(self, port: int, root: str, tag: str, load: Load) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.load = load
        self._start = ctx.Value("d", 0.0)
        self._go = ctx.Event()
        self._abort = ctx.Event()
        self._out = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_publisher,
                args=(port, root, tag, me, load, self._start, self._go, self._abort, self._out),
                daemon=True,
                name=f"publisher-{me}",
            )
            for me in range(load.publishers)
        ]

    def start(self, lead_s: float = 0.5) -> float:
        """Start the processes, wait until each is connected, then let them go; t0."""
        self.launch()
        t0 = time.monotonic() + lead_s
        self.go(t0)
        return t0

    def launch(self) -> None:
        """Start the processes and wait until each is connected."""
        for proc in self._procs:
            proc.start()
        for _ in self._procs:
            kind, *_rest = self._out.get(timeout=60)
            assert kind == "ready", kind

    def go(self, t0: float) -> None:
        """Let the launched processes go, operation i due at `t0 + i / rate` (several
        `Publishers` given one t0 run on one schedule)."""
        self._start.value = t0
        self._go.set()

    def results(self, timeout_s: float) -> tuple[list[float], int, int, float]:
        """When each operation was handed to paho (by index), publish errors (refused,
        or the connection lost), PUBACKs received, the publishers' CPU seconds."""
        sent = [float("nan")] * self.load.total
        refused = pubacks = 0
        cpu = 0.0
        deadline = time.monotonic() + timeout_s
        for _ in self._procs:
            kind, me, raw, ref, acks, used = self._out.get(
                timeout=max(1.0, deadline - time.monotonic())
            )
            assert kind == "done", kind
            times = array("d")
            times.frombytes(raw)
            for n, t in enumerate(times):
                sent[n * self.load.publishers + me] = t
            refused += ref
            pubacks += acks
            cpu += used
        return sent, refused, pubacks, cpu

    def stop(self) -> None:
        self._abort.set()
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


class Acks:
    """Every op's first answer on `<root>/devices/+/sync/ack`: when it arrived (monotonic)
    and its status (a rejection's with its code: `rejected:rate_limited`)."""

    def __init__(self, port: int, root: str) -> None:
        self.topic = f"{root}/devices/+/sync/ack"
        self.answers: dict[str, tuple[float, str]] = {}
        self.messages = 0
        self.malformed = 0
        self.client = Client(port)
        self.client.paho.on_message = self._on_message

    def start(self) -> Acks:
        """Connected and subscribed (SUBACK in) before the load starts."""
        self.client.connect().subscribe(self.topic)
        return self

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        arrived = time.monotonic()
        received = Received(message.topic, bytes(message.payload), bool(message.retain), None)
        try:
            results = results_of([received])
            pairs = [(str(r["op_id"]), _status(r)) for r in results]
        except (AssertionError, ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        self.messages += 1
        for op, status in pairs:
            self.answers.setdefault(op, (arrived, status))

    def close(self) -> None:
        self.client.close()


def _status(result: dict[str, Any]) -> str:
    status = str(result["status"])
    if status == "rejected":
        return f"rejected:{result['error']['code']}"
    return status


# -- the gateway ----------------------------------------------------------------


def imported_from(checkout: Path) -> Path:
    """Where `python -m gateway`, run in `checkout`, takes its `gateway` package from."""
    proc = subprocess.run(
        [sys.executable, "-v", "-m", "gateway", "--help"],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = re.search(
        r"^# code object from '?(/\S*)/gateway/(?:__pycache__/)?__init__",  # the last /gateway/
        proc.stderr,
        re.MULTILINE,
    )
    if found is None:
        raise RuntimeError(f"{checkout}: could not tell where `gateway` came from")
    return Path(found.group(1))


def describe(checkout: Path) -> dict[str, Any]:
    """The checkout's path, its commit, and whether what the daemon loads (its packages
    and config, untracked files included) differs from that commit: the daemon runs
    what is on disk when it starts."""

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else "?"

    status = git("status", "--porcelain", "--", "gateway", "storage", "handlers", "config")
    return {"path": str(checkout), "commit": git("rev-parse", "HEAD"), "dirty": status != ""}


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid`, all its threads; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of its direct children, by pid."""
    out: dict[int, float] = {}
    for p in (pid, *children(pid)):
        used = proc_cpu(p)
        if used is not None:
            out[p] = used
    return out


def dump_stacks(pid: int, path: Path) -> str | None:
    """Ops left unanswered: what the gateway and its children were doing (py-spy dump,
    if installed), written to `path`; the path, or None."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return None
    with open(path, "w") as out:
        for p in (pid, *children(pid)):
            out.write(f"== pid {p}\n")
            out.flush()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    [py_spy, "dump", "--pid", str(p)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=30,
                    check=False,
                )
    return str(path)


class Gateway:
    """`python -m gateway run` in `checkout`, its config from the checkout and the
    environment, ready at READY=1."""

    def __init__(self, checkout: Path, workdir: Path, broker_port: int, **overrides: str) -> None:
        """`overrides`: settings as `daemon_env` takes them (`LIMITS__DEVICE_RATE="40"`)."""
        self.checkout = checkout
        self.workdir = workdir
        self.metrics_port = free_port()
        self.env = daemon_env(
            workdir,
            broker_port,
            LOG__LEVEL="warning",
            METRICS__LISTEN=f"127.0.0.1:{self.metrics_port}",
            **overrides,
        )
        self.log_path = workdir / "gateway.log"
        self.db = workdir / "fieldgate.db"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def root(self) -> str:
        return self.env["FIELDGATE_MQTT__TOPIC_ROOT"]

    def start(self, timeout_s: float = 60.0) -> Gateway:
        notify = NotifySocket(self.workdir / "notify.sock")
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": str(notify.path)}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        config = self.checkout / "config" / "fieldgate.toml"
        try:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "run", "--config", str(config)],
                    cwd=self.checkout,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            proc = self.proc

            def ready() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited {proc.returncode}:\n{self.log()[-3000:]}")
                return notify.ready_at is not None

            wait_for(ready, timeout_s, interval=0.02)
        finally:
            notify.close()
        cwd = Path(os.readlink(f"/proc/{self.proc.pid}/cwd"))
        if cwd.resolve() != self.checkout.resolve():
            raise RuntimeError(f"the gateway runs in {cwd}, not {self.checkout}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def complaints(self) -> list[str]:
        """Its log lines at warning or above (the level it runs at: all of them)."""
        return [line for line in self.log().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, signal.SIGTERM, 30)

    def counts(self) -> dict[str, int | None]:
        """Rows stored, conflicts detected and payloads quarantined (read after the stop)."""
        out: dict[str, int | None] = {}
        for name, sql in (
            ("rows", "select count(*) from sync_log"),
            ("conflicts", "select count(*) from conflicts"),
            ("quarantined", "select count(*) from quarantine"),
        ):
            try:
                with contextlib.closing(sqlite3.connect(self.db, timeout=10)) as conn:
                    out[name] = int(conn.execute(sql).fetchone()[0])
            except sqlite3.Error:
                out[name] = None
        return out


# -- one run --------------------------------------------------------------------


def run_once(
    variant: str,
    checkout: Path,
    index: int,
    load: Load,
    broker: Mosquitto,
    base: Path,
    settle_s: float,
) -> dict[str, Any]:
    tag = f"{variant}{index}-{uuid.uuid4().hex[:6]}"
    workdir = base / tag
    workdir.mkdir(parents=True)
    loadavg = os.getloadavg()[0]
    gateway = Gateway(checkout, workdir, broker.port)
    acks: Acks | None = None
    publishers: Publishers | None = None
    assert broker.proc is not None
    try:
        gateway.start()
        assert gateway.proc is not None
        pid = gateway.proc.pid
        acks = Acks(broker.port, gateway.root).start()
        # The subscriber's own collections would count as the gateway's latency: with
        # the answers piling up in this process, they paused its paho thread for up to
        # 150 ms (a max of 133-153 ms in runs whose gateway never stalled that long).
        gc.disable()
        publishers = Publishers(broker.port, gateway.root, tag, load)
        t0 = publishers.start()
        measured_from = t0 + load.warmup_s
        measured_to = measured_from + load.duration_s
        time.sleep(max(0.0, measured_from - time.monotonic()))
        cpu_before, broker_before = tree_cpu(pid), proc_cpu(broker.proc.pid)
        own_before = time.process_time()
        time.sleep(max(0.0, measured_to - time.monotonic()))
        cpu_after, broker_after = tree_cpu(pid), proc_cpu(broker.proc.pid)
        own_s = time.process_time() - own_before
        sent, errors, pubacks, publisher_cpu = publishers.results(timeout_s=120)
        answers = acks.answers
        ids = [op_id(tag, i) for i in range(load.total)]
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(answers) >= load.total, timeout=settle_s, interval=0.05)
        series = scrape(gateway.metrics_port)
        engine_pids = children(pid)
        stall = None if len(answers) >= load.total else dump_stacks(pid, workdir / "stall.txt")
    finally:
        gc.enable()
        if publishers is not None:
            publishers.stop()
        if acks is not None:
            acks.close()
        gateway.stop()
    exit_code = gateway.proc.returncode if gateway.proc is not None else None
    counts = gateway.counts()
    complaints = gateway.complaints()

    w = load.warmup_ops
    measured = range(w, load.total)
    latencies = [
        (answers[ids[i]][0] - sent[i]) * 1000
        for i in measured
        if ids[i] in answers and not math.isnan(sent[i])
    ]
    statuses = Counter(answers[ids[i]][1] for i in measured if ids[i] in answers)
    lateness = [
        (sent[i] - (t0 + i / load.rate)) * 1000 for i in measured if not math.isnan(sent[i])
    ]
    span = sent[load.total - 1] - sent[w]
    n_measured = len(measured)

    def per_op_us(seconds: float) -> float:
        return round(seconds / n_measured * 1e6, 1)

    gw_s = cpu_after.get(pid, 0.0) - cpu_before.get(pid, 0.0)
    child_s = sum(t - cpu_before.get(p, 0.0) for p, t in cpu_after.items() if p != pid)
    commits = series.get("fieldgate_commit_seconds_count", 0.0)
    result: dict[str, Any] = {
        "variant": variant,
        "run": index + 1,
        "loadavg_1m_at_start": round(loadavg, 2),
        "ops_sent": load.total,
        "ops_measured": n_measured,
        "latency_ms": summary_ms(latencies),
        "answered": sum(1 for i in range(load.total) if ids[i] in answers),
        "unanswered": sum(1 for i in range(load.total) if ids[i] not in answers),
        "unanswered_measured": n_measured - sum(statuses.values()),
        "statuses_measured": dict(statuses),
        "not_stored_measured": sum(n for s, n in statuses.items() if s != "stored"),
        "ack_messages": acks.messages,
        "ack_malformed": acks.malformed,
        "achieved_rate": round((n_measured - 1) / span, 1) if span > 0 else None,
        "lateness_ms": summary_ms(lateness),
        "publish_errors": errors,
        "pubacks": pubacks,
        "cpu_us_per_op": {
            "gateway": per_op_us(gw_s),
            "children": per_op_us(child_s),
            "total": per_op_us(gw_s + child_s),
            "broker": per_op_us((broker_after or 0.0) - (broker_before or 0.0)),
            "publishers": round(publisher_cpu / load.total * 1e6, 1),
            "subscriber": per_op_us(own_s),
        },
        "child_pids": engine_pids,
        "commits": int(commits),
        "commit_batch_mean": round(
            series.get("fieldgate_commit_batch_messages_sum", 0.0) / commits, 1
        )
        if commits
        else None,
        "commit_ms_mean": round(series.get("fieldgate_commit_seconds_sum", 0.0) / commits * 1e3, 2)
        if commits
        else None,
        **counts,
        "exit_code": exit_code,
        "log_lines": len(complaints),
        "log_first": complaints[:3],
        "log_last": complaints[-3:] if len(complaints) > 3 else [],
        "stall_stacks": stall,
    }
    lat = result["latency_ms"]
    log(
        f"{variant} #{index + 1}: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
        f"{result['achieved_rate']} ops/s, {result['unanswered']} unanswered"
    )
    return result


# -- the report -----------------------------------------------------------------


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    unanswered: dict[str, int] = {}
    for variant, results in runs.items():
        # left out of the percentiles: with any, a run's p99 is only a lower bound
        unanswered[variant] = sum(r["unanswered_measured"] for r in results)
        answered = [r for r in results if r["latency_ms"].get("count")]
        if not answered:
            continue
        medians[variant] = {
            key: round(statistics.median(r["latency_ms"][key] for r in answered), 2)
            for key in ("p50", "p90", "p99", "max")
        }
        medians[variant]["cpu_us_per_op"] = round(
            statistics.median(r["cpu_us_per_op"]["total"] for r in results), 1
        )
        medians[variant]["achieved_rate"] = round(
            statistics.median(r["achieved_rate"] or 0.0 for r in results), 1
        )
        medians[variant]["unanswered"] = unanswered[variant]
    out: dict[str, Any] = {"median": medians, "unanswered_measured": unanswered}
    if "before" in medians and "after" in medians:
        out["after_over_before"] = {
            key: round(medians["after"][key] / medians["before"][key], 3)
            if medians["before"][key]
            else None
            for key in ("p50", "p99", "cpu_us_per_op")
        }
    if "after" in medians:
        out["target"] = {
            "p99_ms_at_most": TARGET_P99_MS,
            "after_p99_ms": medians["after"]["p99"],
            "met": medians["after"]["p99"] <= TARGET_P99_MS and not unanswered["after"],
        }
    return out


def _ms(summary: dict[str, float], key: str, width: int) -> str:
    value = summary.get(key)
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def text(report: dict[str, Any]) -> str:
    load = report["load"]
    lines = [
        f"sync ack latency: {load['rate']:,.0f} ops/s from {load['devices']} devices "
        f"({load['publishers']} publisher processes), QoS 1, one op a message, "
        f"{load['duration_s']:g} s measured after {load['warmup_s']:g} s warm-up, "
        f"{report['repeat']} run(s) each; {report['machine']['nproc']} CPUs",
        *(
            f"  {v}: {c['path']} at {c['commit'][:12]}"
            + (" + uncommitted changes" if c["dirty"] else "")
            for v, c in report["checkouts"].items()
        ),
        "",
        f"{'variant':<8}{'run':>4}{'ops/s':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}"
        f"{'count':>8}{'unans.':>7}{'!stored':>8}{'late p99':>9}{'cpu us/op':>10}"
        f"{'(engine)':>9}{'batch':>7}{'commit':>7}{'load':>6}",
    ]
    for results in report["runs"].values():
        for r in results:
            lat = r["latency_ms"]
            cpu = r["cpu_us_per_op"]
            lines.append(
                f"{r['variant']:<8}{r['run']:>4}{r['achieved_rate'] or 0:>9,.0f}"
                f"{_ms(lat, 'p50', 8)}{_ms(lat, 'p90', 8)}{_ms(lat, 'p99', 8)}{_ms(lat, 'max', 9)}"
                f"{lat.get('count', 0):>8}{r['unanswered']:>7}"
                f"{r['not_stored_measured']:>8}{r['lateness_ms'].get('p99', 0):>9.2f}"
                f"{cpu['total']:>10.0f}{cpu['children']:>9.0f}"
                f"{r['commit_batch_mean'] or 0:>7.1f}{r['commit_ms_mean'] or 0:>7.1f}"
                f"{r['loadavg_1m_at_start']:>6.2f}"
            )
    lines += [
        "(latencies in ms; 'unans.': ops of the run never answered, 'late p99': how far",
        " behind schedule the publishers handed ops to paho, ms; 'cpu us/op': the gateway",
        " and its children, '(engine)': the children alone; 'batch', 'commit': messages",
        " and ms per commit, means; 'load': the load average at the start)",
    ]
    summary = report["summary"]
    lines.append("")
    for variant, m in summary["median"].items():
        lines.append(
            f"median {variant:<7} p50 {m['p50']:>7.2f} ms   p99 {m['p99']:>7.2f} ms   "
            f"CPU {m['cpu_us_per_op']:>5.0f} us/op   {m['achieved_rate']:,.0f} ops/s"
            + (f"   ({m['unanswered']:.0f} ops unanswered, left out)" if m["unanswered"] else "")
        )
    ratio = summary.get("after_over_before")
    if ratio:
        lines.append(
            f"after / before: p50 {ratio['p50']}, p99 {ratio['p99']}, "
            f"CPU per op {ratio['cpu_us_per_op']}"
        )
    target = summary.get("target")
    if target:
        lines.append(
            f"target p99 <= {target['p99_ms_at_most']:g} ms: after p99 {target['after_p99_ms']} ms,"
            f" {'met' if target['met'] else 'NOT met'}"
            + (" (ops left unanswered)" if summary["unanswered_measured"].get("after") else "")
        )
    for variant in report["runs"]:
        if variant not in summary["median"]:
            lines.append(f"{variant}: no op answered in any run")
    for results in report["runs"].values():
        for r in results:
            if r["log_lines"] or r["unanswered"] or r["publish_errors"] or r["ack_malformed"]:
                lines.append(
                    f"{r['variant']} #{r['run']}: {r['log_lines']} log lines at warning+, "
                    f"{r['unanswered']} unanswered, {r['publish_errors']} publish errors, "
                    f"{r['ack_malformed']} malformed acks; first: {r['log_first'][:1]}"
                )
            if r.get("stall_stacks"):
                lines.append(f"  stacks at the stall: {r['stall_stacks']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ack_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--before", type=Path, help="checkout of the code before the change")
    parser.add_argument("--after", type=Path, default=ROOT, help="[default: %(default)s]")
    parser.add_argument("--rate", type=float, default=2000.0, help="sync ops/s in total")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds excluded first")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--entities", type=int, default=1_000_000, help="tasks edited")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds to wait for answers after the load"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, dbs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.devices < 1 or args.repeat < 1 or args.publishers < 1:
        parser.error("rate, devices, repeat and publishers must be positive")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("duration must be positive, warmup not negative")
    load = Load(
        rate=args.rate,
        devices=args.devices,
        duration_s=args.duration,
        warmup_s=args.warmup,
        entities=args.entities,
        publishers=args.publishers,
        seed=args.seed,
    )
    checkouts = {"after": args.after.resolve()}
    if args.before is not None:
        checkouts = {"before": args.before.resolve(), **checkouts}
    for variant, checkout in checkouts.items():
        source = imported_from(checkout)
        if source.resolve() != checkout:
            parser.error(f"{variant}: `python -m gateway` in {checkout} imports from {source}")
        log(f"{variant}: python -m gateway in {checkout} imports {source}/gateway")

    base = Path(tempfile.mkdtemp(prefix="fieldgate-ack-latency-"))
    broker = Mosquitto(base / "mosquitto", persistence=False).start()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in checkouts}
    try:
        for index in range(args.repeat):
            for variant, checkout in checkouts.items():
                runs[variant].append(
                    run_once(variant, checkout, index, load, broker, base, args.settle)
                )
    finally:
        broker.stop(10, kill=True)
        stalled = any(r.get("stall_stacks") for rs in runs.values() for r in rs)
        if args.keep or stalled:
            log(f"kept {base}" + (" (ops left unanswered: logs and stacks)" if stalled else ""))
        else:
            shutil.rmtree(base, ignore_errors=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "load": asdict(load),
        "repeat": args.repeat,
        "checkouts": {v: describe(p) for v, p in checkouts.items()},
        "summary": summarize(runs),
        "runs": runs,
    }
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
