"""A long chain: one field of one entity edited 50,000 times by 10 devices in one window.

    .venv/bin/python -m benchmarks.conflict_chain [--edits 50000] [--batch 100]
        [--baseline 5000] [--postgres URL]

Every edit collides with the stored edits of the other devices around it: they
form one conflict, which grows to 50,000 members. The cost of a new edit must not
grow with the group nor with the edits in the window (issue 11: the last 1,000
edits within 2x the time of the first 1,000). The edits are committed through
the writer and the sync step as the daemon commits them, `--batch` per
transaction, and timed per batch.

The baseline, in the same run, is detection without the window summaries (every
edit judged against every stored edit in its window, as v1 did), on the first
`--baseline` edits: its cost grows with the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway import config
from gateway.ingest.assembly import make_detector
from handlers.records import OpRecord
from storage import migrate
from storage.db import create_engine
from storage.detection import DetectionPass, DetectionStep
from storage.sync import SyncStep
from storage.writer import Writer, WriteSet

STATUSES = ["open", "in_progress", "blocked", "done", "on_hold"]
START_US = 1_796_000_000_000_000


def log(message: str) -> None:
    print(f"[chain {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def edits(count: int, devices: int, seed: int = 1) -> list[OpRecord]:
    """`count` edits of `status` of one work order, in arrival order: edited within 300 s,
    each arriving a little after it was made (jitter), so arrival is nearly in time."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        edited = START_US + n * 290_000_000 // count + rng.randrange(2_000_000)
        status = STATUSES[rng.randrange(len(STATUSES))]
        changes = {"status": {"old": None, "new": status}}
        out.append(
            OpRecord(
                op_id=f"c{n:06d}",
                device_id=f"d{rng.randrange(devices)}",
                user_id=f"u{rng.randrange(devices)}",
                entity_type="work_order",
                entity_id="wo-chain",
                operation="update",
                changes=changes,
                changes_json=json.dumps(changes),
                edited_at_us=edited,
                received_at_us=edited + 1_000_000,
            )
        )
    return out


async def run(url: str, records: list[OpRecord], batch: int, windows: bool) -> list[float]:
    """Seconds per edit of each batch, committed one batch at a time."""
    await asyncio.to_thread(migrate.upgrade, url)
    settings = config.Settings(database=config.DatabaseConfig(url=url))
    detector = make_detector(settings)
    detector.windows = windows
    engine = create_engine(url)
    writer = Writer(engine, [SyncStep(detector), DetectionStep(detector)])
    per_op: list[float] = []
    try:
        for start in range(0, len(records), batch):
            part = records[start : start + batch]
            began = time.perf_counter()
            await writer.commit(WriteSet(list(part)))
            # judged after the ack, as the engine does: a pass of the batch's edits
            await writer.commit(WriteSet([DetectionPass(len(part))]))
            per_op.append((time.perf_counter() - began) / len(part))
    finally:
        await writer.close()
        await engine.dispose()
    log(f"windows={windows}: fast {detector.fast}, slow {detector.slow}")
    return per_op


def first_last(per_op: list[float], batch: int, span: int = 1000) -> tuple[float, float]:
    n = max(1, span // batch)
    return statistics.mean(per_op[:n]), statistics.mean(per_op[-n:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=50_000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--baseline", type=int, default=5000)
    parser.add_argument("--postgres", default=None, help="an empty database's async URL")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fg-chain-"))
    out: dict[str, Any] = {"edits": args.edits, "devices": args.devices, "batch": args.batch}
    for name, windows, count in (("windows", True, args.edits), ("baseline", False, args.baseline)):
        url = args.postgres or f"sqlite+aiosqlite:///{workdir}/{name}.db"
        per_op = asyncio.run(run(url, edits(count, args.devices), args.batch, windows))
        first, last = first_last(per_op, args.batch)
        out[name] = {
            "edits": count,
            "first_1000_us_per_op": round(first * 1e6, 1),
            "last_1000_us_per_op": round(last * 1e6, 1),
            "last_over_first": round(last / first, 2),
        }
        log(f"{name}: {json.dumps(out[name])}")
        if args.postgres:
            break
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
