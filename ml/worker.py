"""The body of a training worker process (ml/pipeline.py starts it).

A module of its own so that the process imports only what training needs (numpy,
scikit-learn), not the registry, the database layer or the daemon: a spawned
process imports everything its target's module does before it can start.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from ml.dataset import Dataset
from ml.train import Algorithm, Progress, TrainingFailed, TrainResult, metrics, train

NICENESS = 10
"""How far a training run stands back from ingest for the CPU (nice(2))."""


@dataclass(frozen=True)
class Extraction:
    """Where the worker reads its dataset itself: the daemon's event loop must not
    run the extraction's seconds of numpy, nor hold its memory."""

    database_url: str
    window_s: float
    first_sync_hours: float
    since_us: int | None
    as_of_us: int | None


@dataclass(frozen=True)
class Incumbent:
    """The active model, to be judged on the new model's holdout: a scheduled model
    replaces it only if it does better on the same operations."""

    model_id: str
    file_path: str
    sha256: str


def main(
    conn: Connection,
    stop: Event,
    source: Dataset | Extraction,
    algorithm: Algorithm,
    seed: int,
    min_rows: int,
    n_jobs: int,
    incumbent: Incumbent | None = None,
) -> None:
    """Extract (when given an `Extraction`) and train, sending `("progress", stage,
    done, total)` as it goes and then one final message: `("done", TrainResult)` or
    `("failed", reason)`. Anything else (a bug, the OOM killer) closes the pipe
    without a final message. With an `incumbent`, the result's metrics carry its
    figures on the same holdout (`metrics["incumbent"]`)."""

    # Minutes of CPU that must not slow ingest on a machine of two cores: the engine
    # and the MQTT process go first (the soak: the engine fell from ~40% of a core to
    # ~25% while a run took the other).
    os.nice(NICENESS)

    def report(stage: str, done: int, total: int) -> None:
        conn.send(("progress", stage, done, total))

    try:
        dataset = source if isinstance(source, Dataset) else _extract(source, report)
        result = train(
            dataset,
            algorithm,
            seed=seed,
            progress=report,
            cancelled=stop.is_set,
            min_rows=min_rows,
            n_jobs=n_jobs,
        )
        if incumbent is not None:
            result.metrics["incumbent"] = _judge(incumbent, dataset, result)
    except TrainingFailed as exc:
        conn.send(("failed", exc.reason))
    else:
        conn.send(("done", result))
    finally:
        conn.close()


def _judge(incumbent: Incumbent, dataset: Dataset, result: TrainResult) -> dict[str, Any]:
    """The incumbent's metrics on the new model's holdout; a file that cannot be loaded
    any more is said so (and loses to any model)."""
    from ml.registry import load
    from ml.serving import ModelRefused

    held = dataset.stored_at >= result.window.holdout_from_us
    try:
        model = load(incumbent.file_path, incumbent.sha256)
    except ModelRefused as exc:
        return {"model_id": incumbent.model_id, "refused": exc.reason}
    scores = model.predict_proba(dataset.X[held])[:, 1]
    return {"model_id": incumbent.model_id, **metrics(dataset.y[held].astype(np.int8), scores)}


def _extract(source: Extraction, report: Progress) -> Dataset:
    from ml.features import extract
    from storage.db import create_engine

    async def run() -> Dataset:
        engine = create_engine(source.database_url, pool_size=1)
        try:
            return await extract(
                engine,
                window_s=source.window_s,
                first_sync_hours=source.first_sync_hours,
                since_us=source.since_us,
                as_of_us=source.as_of_us,
                progress=lambda done, total: report("extract", done, total),
            )
        finally:
            await engine.dispose()

    return asyncio.run(run())
