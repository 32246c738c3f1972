"""Feature extraction benchmark: `ml.features.extract` over a causal log of 1M operations.

    .venv/bin/python -m benchmarks.ml_extract [--ops 1000000] [--workdir DIR]
        [--postgres postgresql://postgres@127.0.0.1:5432/test] [--no-sqlite]
        [--repeat 3] [--build-only]

Builds once, then reuses, a log of `--ops` operations of the causal scenario (seed 1,
100 devices, 5,000 entities, the simulated clock at 4 payloads/s: about three days of
crew work) stored through the daemon's handler, writer and detection
(`tests.support.ml_data`): on SQLite in `<workdir>/causal-<ops>.db`, and with
`--postgres` in the database `fg_ml_<ops>` on that server. Then times `extract` over
the whole log (window 300 s, eligibility at the latest receipt), `--repeat` times,
and prints each run's seconds, rows/s and the part spent reading the log (to its
last chunk), and the medians, as JSON on stdout.

The OS page cache is warm (the log was just written or read): say so when quoting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.causal_log import build
from ml.features import extract
from storage.db import create_engine

WINDOW_S = 300.0


def log(message: str) -> None:
    print(f"[ml_extract {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def postgres_url(admin_url: str, ops: int) -> str:
    """The database `fg_ml_<ops>` on the server of `admin_url`, created if missing."""
    name = f"fg_ml_{ops}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


async def measure(url: str, repeat: int) -> dict[str, Any]:
    engine = create_engine(url)
    runs: list[float] = []
    reads: list[float] = []
    rows = 0
    try:
        marks: list[float] = []
        for _ in range(repeat):
            marks.clear()
            started = time.perf_counter()
            dataset = await extract(
                engine, window_s=WINDOW_S, progress=lambda *_: marks.append(time.perf_counter())
            )
            seconds = time.perf_counter() - started
            rows = len(dataset)
            runs.append(seconds)
            reads.append(marks[-1] - started)
            log(
                f"{rows:,} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s; "
                f"reading the log {reads[-1]:.1f} s)"
            )
    finally:
        await engine.dispose()
    median = statistics.median(runs)
    return {
        "rows": rows,
        "seconds": round(median, 2),
        "rows_per_s": round(rows / median),
        "runs_s": [round(s, 2) for s in runs],
        "read_s": round(statistics.median(reads), 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    targets: dict[str, str] = {}
    if args.sqlite:
        args.workdir.mkdir(parents=True, exist_ok=True)
        targets["sqlite"] = f"sqlite+aiosqlite:///{args.workdir / f'causal-{args.ops}.db'}"
    if args.postgres:
        targets["postgresql"] = postgres_url(args.postgres, args.ops)
    results: dict[str, Any] = {"ops": args.ops}
    for name, url in targets.items():
        await build(url, args.ops, log)
        if not args.build_only:
            results[name] = await measure(url, args.repeat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fg-ml-extract"))
    parser.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL server")
    parser.add_argument("--no-sqlite", dest="sqlite", action="store_false")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
