"""Conflict detection benchmark: drain rate and memory against the size of the sync log.

    .venv/bin/python -m benchmarks.conflicts [--sizes 0,1000000,10000000]
        [--messages 20000] [--repeat 3] [--workdir DIR] [--out FILE]
        [--postgres postgresql://postgres@127.0.0.1:5432/test]
        [--own-postgres shared_buffers=4GB,max_wal_size=8GB]

For each size N of sync log already stored, and each variant:

- `off`: `conflicts.enabled = false` (no detection; the counters are still kept),
- `on`: detection on (the shipped config): the window summaries answer edits of
  summarized entities, the database the others (an entity of the prebuilt log is
  summarized at its first edit in the run),

the benchmark

1. builds (once per N) a SQLite database (with `--postgres`: a PostgreSQL
   database `fg_bench_<N>` on that server, kept for the next run; with
   `--own-postgres`: on a cluster of its own, removed at the end) with N rows
   written straight into it: N / 20 entities of the four default types with
   20 operations each, edited over the last 30 days, rows in index order so
   the B-trees grow by appending;
2. creates the daemon's persistent session (start it, wait for READY, stop it);
3. publishes M single-operation messages at QoS 1 to the broker and counts the
   PUBACKs, so the whole backlog waits in the broker: 200 devices, 95% of the
   ops on random existing entities (cold: nothing of them in memory; their
   values agree, so they are compared but do not conflict) and 5% on 50 hot
   entities of the run (which conflict), edited within the last minute
   (`--hot` sets that share: 1% by default, 5% for a conflict storm);
4. starts the daemon and waits until the sync log holds all M new rows;
   the drain rate is M / (last `stored_at` - first `received_at`) of those rows,
   read from the database itself; memory is the daemon's VmHWM (peak RSS)
   from /proc before it is stopped; CPU per op is the daemon's user + system
   time for the run less that of a start and stop with nothing to do, over M
   (less sensitive than the wall-clock rate to other load on the machine).

Medians over `--repeat` runs. The OS page cache is warm (the database was just
written or read); say so when quoting the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from storage import migrate
from storage.conflict_store import WAITING_SQL
from tests.support import Daemon, Mosquitto, PostgresServer, daemon_env, wait_for

TYPES = ("asset", "attendance", "task", "work_order")
OPS_PER_ENTITY = 20
FIELDS = ("status", "title", "notes", "priority", "location", "assigned_to")
VARIANTS: dict[str, dict[str, str]] = {
    "off": {"CONFLICTS__ENABLED": "false"},
    "on": {},
}


def log(message: str) -> None:
    print(f"[conflicts {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_us() -> int:
    return time.time_ns() // 1000


def entity_count(size: int) -> int:
    return max(size // OPS_PER_ENTITY, 1)


def entity_key(index: int, entities: int) -> tuple[str, str]:
    """Entities in index order: type-major, then zero-padded id."""
    per_type = -(-entities // len(TYPES))
    return TYPES[index // per_type], f"e{index % per_type:09d}"


SYNC_COLUMNS = (
    "op_id, device_id, user_id, entity_type, entity_id, operation, changes, edited_at,"
    " received_at, stored_at, version, base_version, session_id, batch_id, device_meta"
)


def generate(size: int) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """`size` sync log rows and their entities, in chunks, in index order."""
    entities = entity_count(size)
    per_type = -(-entities // len(TYPES))
    base = now_us() - 30 * 86400 * 1_000_000
    span = 30 * 86400 * 1_000_000 - 3600 * 1_000_000
    step = (span // 2) // OPS_PER_ENTITY
    rng = random.Random(1)
    rows: list[tuple[Any, ...]] = []
    ent_rows: list[tuple[Any, ...]] = []
    serial = 0
    for index in range(entities):
        entity_type = TYPES[index // per_type]
        entity_id = f"e{index % per_type:09d}"
        start = base + rng.randrange(span // 2)
        for version in range(1, OPS_PER_ENTITY + 1):
            edited = start + version * step
            name = FIELDS[rng.randrange(len(FIELDS))]
            changes = json.dumps({name: {"old": "a", "new": f"v{rng.randrange(100)}"}})
            rows.append(
                (
                    f"h{serial:010d}",
                    f"dev{rng.randrange(5000):04d}",
                    f"user{rng.randrange(2000):04d}",
                    entity_type,
                    entity_id,
                    "update",
                    changes,
                    edited,
                    edited + 1000,
                    edited + 2000,
                    version,
                    None,
                    None,
                    None,
                    None,
                )
            )
            serial += 1
        last_edit = start + OPS_PER_ENTITY * step
        # entities (ENTITY_COLUMNS): summary_from null (no window summaries yet), and
        # judged up to their version, as a log stored through the daemon would be
        ent_rows.append(
            (entity_type, entity_id, OPS_PER_ENTITY, base, last_edit, None, None, OPS_PER_ENTITY)
        )
        if len(rows) >= 200_000:
            yield rows, ent_rows
            rows, ent_rows = [], []
    if rows:
        yield rows, ent_rows


ENTITY_COLUMNS = (
    "entity_type, entity_id, version, updated_at, max_edited_at, delete_max_edited_at,"
    " summary_from, detected_version"
)


class Store:
    """The benchmark's own view of the daemon's database: build it, count rows."""

    url: str

    def exists(self) -> bool:
        raise NotImplementedError

    def write(self, size: int) -> None:
        raise NotImplementedError

    def one(self, sql: str, *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def discard(self) -> None:
        """Remove a database that no later run will reuse."""
        raise NotImplementedError

    def build(self, size: int) -> None:
        """A migrated database with `size` sync log rows, written straight into it."""
        if self.exists():
            return
        migrate.upgrade(self.url)
        if size == 0:
            return
        started = time.monotonic()
        self.write(size)
        log(f"built {size:,} rows in {time.monotonic() - started:.0f} s")


class SqliteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite+aiosqlite:///{path}"

    def exists(self) -> bool:
        return self.path.exists()

    def write(self, size: int) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-1000000")
        sql = f"insert into sync_log ({SYNC_COLUMNS}) values ({','.join('?' * 15)})"
        for rows, ent_rows in generate(size):
            conn.executemany(sql, rows)
            conn.executemany(
                f"insert into entities ({ENTITY_COLUMNS}) values ({','.join('?' * 8)})", ent_rows
            )
            conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def discard(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def one(self, sql: str, *args: Any) -> tuple[Any, ...]:
        with sqlite3.connect(self.path, timeout=30) as conn:
            row: tuple[Any, ...] = conn.execute(sql, args).fetchone()
        return row


class PostgresStore(Store):
    """Database `fg_bench_<size>` on the server of `admin_url` (kept and reused; the
    empty ones get a fresh name each run)."""

    def __init__(self, admin_url: str, size: int) -> None:
        self.admin_url = admin_url
        self.name = f"fg_bench_{size}" if size else f"fg_bench_0_{uuid.uuid4().hex[:6]}"
        self.plain = f"{admin_url.rsplit('/', 1)[0]}/{self.name}"
        self.url = self.plain.replace("postgresql://", "postgresql+psycopg://", 1)

    def exists(self) -> bool:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            found = conn.execute(
                "select 1 from pg_database where datname = %s", (self.name,)
            ).fetchone()
            if found:
                return True
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return False

    def write(self, size: int) -> None:
        with psycopg.connect(self.plain) as conn:
            for rows, ent_rows in generate(size):
                with conn.cursor() as cur:
                    with cur.copy(f"COPY sync_log ({SYNC_COLUMNS}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    with cur.copy(f"COPY entities ({ENTITY_COLUMNS}) FROM STDIN") as copy:
                        for row in ent_rows:
                            copy.write_row(row)
                conn.commit()
            conn.execute("ANALYZE")
            conn.commit()

    def discard(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def one(self, sql: str, *args: Any) -> tuple[Any, ...]:
        with psycopg.connect(self.plain) as conn:
            row = conn.execute(sql.replace("?", "%s"), args).fetchone()
        assert row is not None
        return tuple(row)


def workload(run: str, messages: int, size: int, hot: float) -> list[tuple[str, bytes]]:
    rng = random.Random(run)
    entities = entity_count(size) if size else 10_000
    now = datetime.now(UTC).timestamp()
    out = []
    for n in range(messages):
        names = rng.sample(FIELDS, rng.choice((1, 1, 2)))
        if rng.random() < hot:
            # Hot: this run's own 50 entities, values that disagree: conflicts.
            entity_type, entity_id = "task", f"hot-{run}-{rng.randrange(50)}"
            changes = {k: {"old": "a", "new": f"n{rng.randrange(4)}"} for k in names}
        else:
            # Cold: an existing entity (a new one on an empty log); every cold
            # edit of a field sets the same value, so two cold edits that meet
            # agree and the conflict count does not depend on the log's size.
            if size:
                entity_type, entity_id = entity_key(rng.randrange(entities), entities)
            else:
                entity_type, entity_id = "task", f"new-{run}-{rng.randrange(entities)}"
            changes = {k: {"old": "a", "new": "same"} for k in names}
        edited = datetime.fromtimestamp(now - rng.uniform(0, 60), UTC)
        op = {
            "op_id": f"{run}-{n}",
            "user_id": f"user{rng.randrange(2000):04d}",
            "entity_type": entity_type,
            "entity_id": entity_id,
            "operation": "update",
            "changes": changes,
            "edited_at": edited.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "session_id": f"s-{rng.randrange(10_000)}",
        }
        device = f"dev{rng.randrange(200):04d}"
        out.append((device, json.dumps(op).encode()))
    return out


def publish(port: int, root: str, items: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for device, payload in items:
        info = client.publish(f"{root}/devices/{device}/sync", payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        infos.append(info)
        if len(infos) % 5000 == 0:
            infos[-5000].wait_for_publish(60)
    for info in infos:
        info.wait_for_publish(60)
        assert info.is_published()
    client.disconnect()
    client.loop_stop()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass
class Result:
    size: int
    variant: str
    rate: float
    hwm_mib: float
    start_s: float
    conflicts: int
    cpu_us_per_op: float
    rate_judged: float
    """Up to the last operation judged: detection runs after the ack."""


def run_once(
    broker: Mosquitto,
    workdir: Path,
    store: Store,
    size: int,
    variant: str,
    messages: int,
    hot: float,
) -> Result:
    run = f"r{uuid.uuid4().hex[:6]}"
    env = daemon_env(
        workdir / run,
        broker.port,
        store.url,
        LOG__LEVEL="warning",
        **VARIANTS[variant],
    )
    env["FIELDGATE_LOG__LEVEL"] = "info"
    daemon = Daemon(workdir / run, env)
    try:
        return _measure(daemon, broker, store, size, variant, messages, run, env, hot)
    finally:
        daemon.stop()


def _measure(
    daemon: Daemon,
    broker: Mosquitto,
    store: Store,
    size: int,
    variant: str,
    messages: int,
    run: str,
    env: dict[str, str],
    hot: float,
) -> Result:
    # A first start creates the broker session and measures what starting costs.
    daemon.start()
    assert daemon.proc is not None
    baseline_cpu = cpu_s(daemon.proc.pid)
    daemon.terminate()
    (last_id,) = store.one("select coalesce(max(id), 0) from sync_log")
    live = "select count(*) from conflicts where status != 'merged'"
    (conflicts_before,) = store.one(live)
    items = workload(run, messages, size, hot)
    publish(broker.port, env["FIELDGATE_MQTT__TOPIC_ROOT"], items)
    t0 = time.monotonic()
    daemon.start()
    start_s = time.monotonic() - t0
    assert daemon.proc is not None
    pid = daemon.proc.pid

    def drained() -> bool:
        (n,) = store.one("select count(*) from sync_log where id > ?", last_id)
        return bool(n >= messages)

    wait_for(drained, timeout=600, interval=0.1)
    # Detection judges after the ack (docs/decisions/0018-detection-after-the-ack.md):
    # when did it judge the last operation (None: it had, when they were all stored)?
    judged_at_us: float | None = None
    if store.one(WAITING_SQL)[0]:
        wait_for(lambda: store.one(WAITING_SQL)[0] == 0, timeout=600, interval=0.05)
        judged_at_us = time.time() * 1e6
    hwm = vm_hwm_kib(pid) / 1024
    cpu = cpu_s(pid) - baseline_cpu
    daemon.terminate(120)
    first, last, n = store.one(
        "select min(received_at), max(stored_at), count(*) from sync_log where id > ?", last_id
    )
    conflicts = store.one(live)[0] - conflicts_before
    assert n == messages, (n, messages)
    rate = messages / ((last - first) / 1e6)
    rate_judged = messages / (((judged_at_us or last) - first) / 1e6)
    cpu_us = cpu / messages * 1e6
    log(
        f"N={size:>10,} {variant:>5}: {rate:8,.0f} ops/s ({rate_judged:,.0f} judged), "
        f"{cpu_us:5.0f} us CPU/op, "
        f"peak RSS {hwm:6.1f} MiB, {conflicts} conflicts, start {start_s:.1f} s"
    )
    return Result(size, variant, rate, hwm, start_s, conflicts, cpu_us, rate_judged)


def make_store(postgres: str | None, workdir: Path, size: int) -> Store:
    if postgres:
        return PostgresStore(postgres, size)
    name = f"log-{size}.db" if size else f"log-0-{uuid.uuid4().hex[:6]}.db"
    return SqliteStore(workdir / name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0,1000000,10000000")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--hot", type=float, default=0.01, help="share of ops on hot entities")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--postgres", default=None, help="admin URL of a PostgreSQL server to run on instead"
    )
    parser.add_argument(
        "--own-postgres",
        default=None,
        metavar="KEY=VALUE,...",
        help="run on a PostgreSQL cluster of the benchmark's own, with these settings",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fg-conflicts-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    if args.own_postgres is not None:
        pairs = [item.split("=", 1) for item in args.own_postgres.split(",") if item]
        server = PostgresServer({key: value for key, value in pairs})
        args.postgres = server.start()
        log(f"own PostgreSQL on port {server.port}: {server.settings}")
    broker = Mosquitto(workdir / "mosquitto", persistence=False).start()
    results: list[Result] = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            for _ in range(args.repeat):
                for variant in args.variants.split(","):
                    store = make_store(args.postgres, workdir, size)
                    store.build(size)
                    try:
                        results.append(
                            run_once(broker, workdir, store, size, variant, args.messages, args.hot)
                        )
                    finally:
                        if size == 0:
                            store.discard()
    finally:
        broker.stop()
        if server is not None:
            server.close()
    summary = []
    for size in sorted({r.size for r in results}):
        for variant in args.variants.split(","):
            mine = [r for r in results if r.size == size and r.variant == variant]
            summary.append(
                {
                    "size": size,
                    "variant": variant,
                    "rate": round(statistics.median(r.rate for r in mine)),
                    "rates": [round(r.rate) for r in mine],
                    "rate_judged": round(statistics.median(r.rate_judged for r in mine)),
                    "peak_rss_mib": round(statistics.median(r.hwm_mib for r in mine), 1),
                    "start_s": round(statistics.median(r.start_s for r in mine), 1),
                    "cpu_us_per_op": round(statistics.median(r.cpu_us_per_op for r in mine)),
                    "cpus_us_per_op": [round(r.cpu_us_per_op) for r in mine],
                    "conflicts": round(statistics.median(r.conflicts for r in mine)),
                }
            )
    meta = {
        "database": "postgresql" if args.postgres else "sqlite",
        "postgres_settings": server.settings if server is not None else None,
        "messages": args.messages,
        "hot": args.hot,
        "cpus": os.cpu_count(),
    }
    text = json.dumps({**meta, "results": summary}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
