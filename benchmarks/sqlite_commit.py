"""Where a SQLite commit's time goes as the sync log grows: statements, commit, checkpoint.

    .venv/bin/python -m benchmarks.sqlite_commit [--sizes 0,10000000] [--batches 20]
        [--workdir DIR]

The writer's statements for one batch of 1,000 operations on 1,000 random
existing entities (as the cold operations of benchmarks/conflicts.py), in
stdlib sqlite3 with the daemon's settings (WAL, `synchronous=FULL`): look up
the op_ids, upsert the entities (RETURNING), insert the rows, commit. No daemon,
no broker, no other thread: what the database itself costs. Each size runs
twice, in the same run: with SQLite's default `wal_autocheckpoint` (1,000 pages:
the commit that crosses it copies the WAL back into the database file) and with
it off (the WAL only grows: the commit alone). Prints milliseconds per batch for
each step, the WAL bytes a commit appends, and the ratio of each size to the
first.

The databases are those of benchmarks/conflicts.py (built in `--workdir` if
missing); each run adds its rows to them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.conflicts import SYNC_COLUMNS, TYPES, SqliteStore, entity_count

UPSERT = (
    "insert into entities (entity_type, entity_id, version, updated_at, max_edited_at,"
    " prev_max_edited_at) values {values} on conflict (entity_type, entity_id) do update set"
    " version = entities.version + excluded.version, updated_at = excluded.updated_at,"
    " prev_max_edited_at = entities.max_edited_at, max_edited_at ="
    " max(coalesce(entities.max_edited_at, excluded.max_edited_at), excluded.max_edited_at)"
    " returning entity_type, entity_id, version"
)
STEPS = ("lookup", "upsert", "insert", "commit")


def batch_times(conn: sqlite3.Connection, size: int, batch: int, tag: str) -> dict[str, float]:
    """Seconds per step for one batch of 1,000 operations."""
    rng = random.Random(f"{tag}-{batch}")
    entities = entity_count(size) if size else 10_000
    per_type = -(-entities // len(TYPES))
    keys: set[tuple[str, str]] = set()
    while len(keys) < 1000:
        index = rng.randrange(entities)
        if size:
            keys.add((TYPES[index // per_type], f"e{index % per_type:09d}"))
        else:
            keys.add(("task", f"new-{tag}-{index}"))
    ordered = sorted(keys)
    op_ids = [f"{tag}-{batch}-{n}" for n in range(len(ordered))]
    now = time.time_ns() // 1000
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    conn.execute("begin immediate")
    conn.execute(
        f"select op_id, version from sync_log where op_id in ({','.join('?' * 1000)})", op_ids
    ).fetchall()
    t1 = time.perf_counter()
    versions: dict[tuple[str, str], int] = {}
    for start in range(0, len(ordered), 900):
        part = ordered[start : start + 900]
        args: list[object] = []
        for entity_type, entity_id in part:
            args += [entity_type, entity_id, 1, now, now, None]
        sql = UPSERT.format(values=",".join(["(?,?,?,?,?,?)"] * len(part)))
        for entity_type, entity_id, version in conn.execute(sql, args):
            versions[(entity_type, entity_id)] = version
    t2 = time.perf_counter()
    changes = json.dumps({"status": {"old": "a", "new": "same"}})
    rows = [
        (op_ids[n], "dev1", "user1", *key, "update", changes, now, now, now, versions[key])
        for n, key in enumerate(ordered)
    ]
    conn.executemany(
        f"insert into sync_log ({SYNC_COLUMNS}) values ({','.join('?' * 11)},null,null,null,null)",
        rows,
    )
    t3 = time.perf_counter()
    conn.execute("commit")
    t4 = time.perf_counter()
    for step, seconds in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
        times[step] = seconds
    return times


def measure(path: Path, size: int, batches: int, autocheckpoint: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint}")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    tag = f"sc{os.urandom(3).hex()}"
    totals = dict.fromkeys(STEPS, 0.0)
    for batch in range(batches):
        for step, seconds in batch_times(conn, size, batch, tag).items():
            totals[step] += seconds
    wal = Path(f"{path}-wal")
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    out = {step: totals[step] / batches * 1000 for step in STEPS}
    out["total"] = sum(out[step] for step in STEPS)
    # With checkpoints off the WAL holds every batch: its size per batch is what one appends.
    out["wal_mb_per_batch"] = wal_bytes / batches / 1e6 if autocheckpoint == 0 else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0,10000000")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fg-sqlite-commit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[tuple[int, str, dict[str, float]]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        store = SqliteStore(workdir / (f"log-{size}.db" if size else "log-0-commit.db"))
        store.build(size)
        for label, autocheckpoint in (("default", 1000), ("off", 0)):
            result = measure(store.path, size, args.batches, autocheckpoint)
            results.append((size, label, result))
            print(
                f"N={size:>10,} checkpoint {label:>7}: "
                + ", ".join(f"{step} {result[step]:6.1f}" for step in (*STEPS, "total"))
                + " ms/batch",
                file=sys.stderr,
                flush=True,
            )
    base = {label: r["total"] for size, label, r in results if size == results[0][0]}
    print("\nsize        checkpoint  lookup upsert insert commit  total  of first  WAL MB/batch")
    for size, label, r in results:
        print(
            f"{size:>10,}  {label:>10}  {r['lookup']:6.1f} {r['upsert']:6.1f} {r['insert']:6.1f}"
            f" {r['commit']:6.1f} {r['total']:6.1f}  {base[label] / r['total']:8.2f}"
            f"  {r['wal_mb_per_batch']:12.1f}"
        )


if __name__ == "__main__":
    main()
