"""The body of a training worker process (ml/pipeline.py starts it).

A module of its own so that the process imports only what training needs (numpy,
scikit-learn), not the registry, the database layer or the daemon: a spawned
process imports everything its target's module does before it can start.
"""

from __future__ import annotations

from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from ml.dataset import Dataset
from ml.train import Algorithm, TrainingFailed, train


def main(
    conn: Connection,
    stop: Event,
    dataset: Dataset,
    algorithm: Algorithm,
    seed: int,
    min_rows: int,
    n_jobs: int,
) -> None:
    """Train, sending `("progress", stage, done, total)` as it goes and then one final
    message: `("done", TrainResult)` or `("failed", reason)`. Anything else (a bug,
    the OOM killer) closes the pipe without a final message."""

    def report(stage: str, done: int, total: int) -> None:
        conn.send(("progress", stage, done, total))

    try:
        result = train(
            dataset,
            algorithm,
            seed=seed,
            progress=report,
            cancelled=stop.is_set,
            min_rows=min_rows,
            n_jobs=n_jobs,
        )
    except TrainingFailed as exc:
        conn.send(("failed", exc.reason))
    else:
        conn.send(("done", result))
    finally:
        conn.close()
