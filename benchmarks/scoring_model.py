"""A conflict model for the drain benchmark's `gateway-model` variant (issue 14: scoring
costs at most 15% of the drain's rate, a model active against none, in one run).

`prepare` stores a causal log through the daemon's writer and detection
(`tests.support.ml_data`), trains a random forest on it with `fieldgate ml train`'s
function, and returns the model's registry row. `install` makes a fresh database
(the one a drain's gateway will use) hold that row as the active model, so the
gateway scores every operation of the backlog from its first batch.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path

from loadgen.generator import GeneratorOptions
from ml.pipeline import TrainParams, train_and_register
from storage import migrate
from storage.db import create_engine
from tests.support.ml_data import store_causal

LOG_OPS = 20_000


async def _prepare(workdir: Path) -> dict[str, object]:
    url = f"sqlite+aiosqlite:///{workdir / 'model-log.db'}"
    options = GeneratorOptions(
        devices=50, entities=2000, seed=7, max_ops=LOG_OPS, payloads_per_s=4.0, max_batch=50
    )
    await store_causal(url, options, ops_per_commit=500)
    engine = create_engine(url)
    try:
        row = await train_and_register(
            engine, TrainParams(algorithm="random_forest", models_dir=workdir / "models", n_jobs=2)
        )
    finally:
        await engine.dispose()
    if row.status != "ready":
        raise RuntimeError(f"the benchmark's model failed: {row.failure_reason}")
    with closing(sqlite3.connect(workdir / "model-log.db")) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("select * from ml_models where id = ?", (row.id,)).fetchone()
    return dict(found)


def prepare(workdir: Path) -> dict[str, object]:
    """The registry row of a forest trained on a causal log of LOG_OPS operations."""
    workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_prepare(workdir))


def install(db: Path, model: dict[str, object]) -> None:
    """`db` migrated, with `model` in its registry as the active model."""
    migrate.upgrade(f"sqlite+aiosqlite:///{db}")
    columns = ", ".join(model)
    marks = ", ".join("?" for _ in model)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(
            f"insert into ml_models ({columns}) values ({marks})",
            [*({**model, "status": "active"}).values()],
        )
        conn.commit()
