"""The causal scenario's log that the conflict-prediction benchmarks read, built once
through the daemon's handler, writer and detection (`tests.support.ml_data`) and
reused: the crew of docs/ml.md (seed 1, 100 devices, 5,000 entities, 4 payloads/s on
the simulated clock, about three days of work a million operations)."""

from __future__ import annotations

import time
from collections.abc import Callable

from loadgen.generator import GeneratorOptions
from storage.db import create_engine
from tests.support.ml_data import store_causal


def options(ops: int) -> GeneratorOptions:
    return GeneratorOptions(
        devices=100, entities=5000, seed=1, max_ops=ops, payloads_per_s=4.0, max_batch=100
    )


async def stored_ops(url: str) -> int:
    """How many operations the log at `url` holds; 0 when there is none yet."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql("select count(*) from sync_log")
            return int(result.scalar_one())
    except Exception:
        return 0
    finally:
        await engine.dispose()


async def build(url: str, ops: int, log: Callable[[str], None]) -> None:
    """The log at `url`, unless it holds `ops` operations already."""
    if await stored_ops(url) == ops:
        log(f"reusing {url.rsplit('/', maxsplit=1)[-1]}: {ops:,} ops")
        return
    started = time.monotonic()
    last = [started]

    def progress(done: int) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            rate = done / (last[0] - started)
            log(f"stored {done:,} of {ops:,} ({rate:,.0f} ops/s)")

    stored = await store_causal(url, options(ops), ops_per_commit=1000, progress=progress)
    log(f"built {stored:,} ops in {time.monotonic() - started:.0f} s")
