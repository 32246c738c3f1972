"""Conflict storm: many devices editing a few hot records at once, detection off and on.

    .venv/bin/python -m benchmarks.conflict_storm [--ops 3000] [--devices 20]
        [--entities 6] [--repeat 3]

The workload of issue 11: `--ops` single operations from `--devices` devices on
`--entities` hot work orders, each changing one or two of two fields (`status`,
a critical field, and `notes`) to values that mostly disagree, all edited within
60 s. Every pair of edits of a field from two devices collides: v1 made a record
per pair (the square of the edits), v2 one conflict per entity.

For each repetition, detection `off` and then `on`, each on a database of its
own: the daemon is started and ready (its engine process serving), the storm
published to a test-owned broker as fast as it takes it, and the rate measured
from the database (the first op's `received_at` to the last op's `stored_at`);
CPU is both processes' from the first publish to the last op stored. Printed:
the rates and their ratio (target: on >= 0.8 of off), the conflict records
(target <= 300) and the conflict messages published (target <= 9,000: each
outbox row to its topic and to the topics it is copied to).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.conflicts import SqliteStore, cpu_s, publish
from benchmarks.drain import _start_profiler, children
from storage.conflict_store import WAITING_SQL
from tests.support import Daemon, Mosquitto, daemon_env, end_process, wait_for


def log(message: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def workload(ops: int, devices: int, entities: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    now = datetime.now(UTC).timestamp()
    out = []
    for n in range(ops):
        fields = rng.sample(["status", "notes"], rng.choice((1, 2)))
        changes = {name: {"old": "a", "new": f"v{rng.randrange(6)}"} for name in fields}
        op = {
            "op_id": f"s{seed}-{n}",
            "user_id": f"user{rng.randrange(devices):02d}",
            "entity_type": "work_order",
            "entity_id": f"wo-hot-{rng.randrange(entities)}",
            "operation": "update",
            "changes": changes,
            "edited_at": datetime.fromtimestamp(now - rng.uniform(0, 60), UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }
        out.append((f"dev{rng.randrange(devices):02d}", json.dumps(op).encode()))
    return out


def run_once(
    broker: Mosquitto,
    workdir: Path,
    detection: bool,
    items: list[tuple[str, bytes]],
    profile: Path | None = None,
) -> dict[str, Any]:
    run = f"storm-{uuid.uuid4().hex[:6]}"
    store = SqliteStore(workdir / f"{run}.db")
    env = daemon_env(workdir / run, broker.port, store.url)
    env["FIELDGATE_CONFLICTS__ENABLED"] = "true" if detection else "false"
    daemon = Daemon(workdir / run, env)
    try:
        # Ready: connected, subscribed, and its engine process serving; then the storm,
        # published as fast as the broker takes it.
        daemon.start()
        assert daemon.proc is not None
        pids = [daemon.proc.pid, *children(daemon.proc.pid)]
        spy = None
        if profile is not None:
            suffix = "on" if detection else "off"
            spy = _start_profiler(pids[-1], profile.with_suffix(f".{suffix}.txt"), "raw")
        cpu_before = sum(cpu_s(pid) for pid in pids)
        publish(broker.port, env["FIELDGATE_MQTT__TOPIC_ROOT"], items)

        def drained() -> bool:
            return bool(store.one("select count(*) from sync_log")[0] >= len(items))

        wait_for(drained, timeout=900, interval=0.05)
        cpu = sum(cpu_s(pid) for pid in pids) - cpu_before

        def judged() -> bool:
            return bool(store.one(WAITING_SQL)[0] == 0)

        # Detection judges after the ack (docs/decisions/0018-detection-after-the-ack.md):
        # the records and messages are counted once it has judged everything.
        judged_at_us: float | None = None
        if not judged():
            wait_for(judged, timeout=900, interval=0.01)
            judged_at_us = time.time() * 1e6
        cpu_judged = sum(cpu_s(pid) for pid in pids) - cpu_before
        if spy is not None:
            end_process(spy, signal.SIGINT)
        daemon.terminate(120)
    finally:
        daemon.stop()
    first, last = store.one("select min(received_at), max(stored_at) from sync_log")
    records = store.one("select count(*) from conflicts where status != 'merged'")[0]
    all_records = store.one("select count(*) from conflicts")[0]
    # messages published: each row goes to its topic and to those it is copied to
    messages = store.one(
        "select coalesce(sum(1 + coalesce(json_array_length(also_to), 0)), 0) from outbox"
        " where topic like '%/conflicts'"
    )[0]
    rows = store.one("select count(*) from outbox where topic like '%/conflicts'")[0]
    members = store.one("select count(*) from conflict_members")[0]
    rate = len(items) / ((last - first) / 1e6)
    result = {
        "detection": detection,
        "rate": round(rate),
        "rate_judged": round(len(items) / (((judged_at_us or last) - first) / 1e6)),
        "cpu_us_per_op": round(cpu / len(items) * 1e6),
        "cpu_us_per_op_judged": round(cpu_judged / len(items) * 1e6),
        "records": records,
        "records_with_merged": all_records,
        "members": members,
        "messages": messages,
        "outbox_rows": rows,
    }
    log(json.dumps(result))
    store.discard()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--entities", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of each run (path)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fg-storm-"))
    broker = Mosquitto(workdir / "mosquitto", persistence=False).start()
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    try:
        for repeat in range(args.repeat):
            items = workload(args.ops, args.devices, args.entities, seed=repeat)
            for detection in (False, True):
                runs[detection].append(run_once(broker, workdir, detection, items, args.profile))
    finally:
        broker.stop()
    off = statistics.median(r["rate"] for r in runs[False])
    on = statistics.median(r["rate"] for r in runs[True])
    summary = {
        "ops": args.ops,
        "devices": args.devices,
        "entities": args.entities,
        "rate_off": round(off),
        "rate_on": round(on),
        "on_over_off": round(on / off, 3),
        "judged_on_over_off": round(
            statistics.median(r["rate_judged"] for r in runs[True]) / off, 3
        ),
        "records": max(r["records"] for r in runs[True]),
        "messages": max(r["messages"] for r in runs[True]),
        "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    log(
        f"on/off {summary['on_over_off']} (target >= 0.8; up to the last operation judged:"
        f" {summary['judged_on_over_off']}); records {summary['records']}"
        f" (<= 300); messages {summary['messages']} (<= 9000)"
    )


if __name__ == "__main__":
    main()
