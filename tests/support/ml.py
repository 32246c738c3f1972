"""Synthetic training data with a signal a model can learn, seeded.

Conflicts come mostly from two causes together (an edit of an entity others are
editing, made by a device that was offline for hours), a little from the user's
history, and not at all from the other two features: each feature alone ranks them
weakly, so a model that uses the two together beats the best single feature.
"""

from __future__ import annotations

import numpy as np

from ml.dataset import Dataset

COMMIT_US = 50_000
"""The synthetic log commits every 50 ms, a few operations at a time."""


def synthetic(rows: int, seed: int, *, base_rate: float = -3.0) -> Dataset:
    rng = np.random.default_rng(seed)
    editors = rng.poisson(0.6, rows).astype(np.float64)
    hours = rng.exponential(10.0, rows)
    rate = rng.beta(2.0, 8.0, rows)
    frequency = rng.poisson(3.0, rows).astype(np.float64)
    overlap = rng.random(rows)
    logit = base_rate + 3.5 * ((editors > 0) & (hours > 8.0)) + 1.0 * rate
    y = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    stored_at = 1_800_000_000_000_000 + (np.arange(rows) // 4) * COMMIT_US
    return Dataset(
        X=np.column_stack([editors, hours, rate, frequency, overlap]),
        y=y,
        stored_at=stored_at.astype(np.int64),
        op_ids=[f"op-{i:06d}" for i in range(rows)],
    )


def relabelled(dataset: Dataset, y: np.ndarray) -> Dataset:
    return Dataset(
        X=dataset.X, y=y.astype(np.int8), stored_at=dataset.stored_at, op_ids=dataset.op_ids
    )
