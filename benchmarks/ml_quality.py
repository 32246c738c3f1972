"""Conflict prediction quality benchmark (issue 14): the models on the causal scenario,
judged on the time-ordered holdout against the best single feature, and what the
seed's approach (whole-table features, a random split) would have reported instead.

    .venv/bin/python -m benchmarks.ml_quality [--ops 200000] [--workdir DIR] [--seed 0]

Builds once, then reuses, a log of `--ops` operations of the causal scenario (seed 1,
100 devices, 5,000 entities, the simulated clock at 4 payloads/s: the crew of
docs/ml.md and benchmarks/ml_extract.py; 200,000 operations are about 14 hours of
work) stored on SQLite in `<workdir>/causal-<ops>.db` through the daemon's handler,
writer and detection (`tests.support.ml_data.store_causal`). Then:

1. extracts the dataset with `ml.features.extract` (window 300 s), trains the random
   forest and the logistic regression as `fieldgate ml train` does
   (`ml.pipeline.train_registered`, hence `ml.train.train`: the first 80% of the
   time to learn from, the latest 20% to be judged on), registered in the log's
   database with their files in `<workdir>/models`, and writes the forest's report
   (`ml.report.write_report`, as `fieldgate ml report` does) into `<workdir>/report`;
2. computes the seed's features, each from the whole table (`whole_table_features`:
   every row of the log counts, before and after the operation, whatever the commit
   order), and trains the same forest on them (`ml.train.train` again): the figure
   the seed would have reported is its stratified random 80/20 split; then scores
   that model (fitted on the random 80%, leaky features) on the point-in-time
   features of the time-ordered holdout, which is what it would see in service, and
   on the whole-table features of the same rows, so that only what it is fed differs.

Prints, as JSON on stdout: for each model its holdout ROC AUC, PR AUC and F1, the
baseline's (its feature) on the same holdout, the stratified split's figures and
whether the target of issue 14 is met (forest ROC AUC >= 0.80 and >= the baseline's
+ 0.03); each feature's own holdout ROC AUC; the seed approach's figures. Progress
on stderr. Delete the work directory after changing the scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_sample_weight
from sqlalchemy.ext.asyncio import AsyncEngine

from benchmarks.causal_log import build
from handlers.times import HOUR_US
from ml import registry
from ml.dataset import DEFAULT_FIRST_SYNC_HOURS, FEATURES, Dataset
from ml.features import NEVER, _Log, _read, extract
from ml.pipeline import TrainParams, train_registered
from ml.report import write_report
from ml.train import (
    FOREST_MAX_DEPTH,
    FOREST_MIN_LEAF,
    FOREST_TREES,
    HOLDOUT_SHARE,
    Algorithm,
    metrics,
    train,
)
from storage import ml_models
from storage.db import create_engine

WINDOW_S = 300.0
TARGET_ROC_AUC = 0.80
TARGET_MARGIN = 0.03

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def log(message: str) -> None:
    print(f"[ml_quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rounded(values: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: round(float(values[name]), 4) for name in names}


def figures(row: ml_models.ModelRow) -> dict[str, Any]:
    """A registered model's figures, as the benchmark reports them."""
    assert row.metrics is not None and row.baseline_metrics is not None
    assert row.window is not None
    held, base = row.metrics["holdout"], row.baseline_metrics["holdout"]
    window = row.window
    return {
        "model_id": row.id,
        "train_rows": window.train_rows,
        "train_positives": window.train_positives,
        "holdout_rows": window.holdout_rows,
        "holdout_positives": window.holdout_positives,
        "holdout": rounded(held, "roc_auc", "pr_auc", "f1", "precision", "recall"),
        "baseline": {
            "feature": row.baseline_metrics["feature"],
            **rounded(base, "roc_auc", "pr_auc", "f1"),
        },
        "stratified": {
            **rounded(row.metrics["stratified"], "roc_auc", "pr_auc", "f1"),
            "baseline_roc_auc": round(float(row.baseline_metrics["stratified"]["roc_auc"]), 4),
        },
        "margin_over_baseline": round(float(held["roc_auc"] - base["roc_auc"]), 4),
        "target_met": bool(
            held["roc_auc"] >= TARGET_ROC_AUC and held["roc_auc"] >= base["roc_auc"] + TARGET_MARGIN
        ),
        "importances": {name: round(v, 3) for name, v in row.metrics["importances"].items()},
    }


async def train_one(
    engine: AsyncEngine, dataset: Dataset, algorithm: Algorithm, params: TrainParams
) -> ml_models.ModelRow:
    """`fieldgate ml train`'s run on an extracted dataset: register, train, save, mark."""
    started = time.monotonic()
    last = [started]

    def progress(stage: str, done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 20 or done == total:
            last[0] = time.monotonic()
            log(f"{algorithm}: {stage} {done}/{total}")

    row = await ml_models.register(engine, algorithm=algorithm, seed=params.seed)
    row = await train_registered(
        engine, row, dataset, replace(params, algorithm=algorithm), progress
    )
    if row.status != "ready":
        raise SystemExit(f"{algorithm} failed: {row.failure_reason}")
    log(f"{algorithm}: {row.id} in {time.monotonic() - started:.0f} s")
    return row


def causal_url(workdir: Path, ops: int) -> str:
    """Where the causal log of `ops` operations lives in `workdir` (`build` it there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{workdir / f'causal-{ops}.db'}"


async def read_dataset(engine: AsyncEngine) -> tuple[_Log, Dataset]:
    """The log behind `engine` and its dataset, extracted as `fieldgate ml train`
    extracts it (window WINDOW_S), as of the log's last receipt."""
    read = await _read(engine, None)
    dataset = await extract(engine, window_s=WINDOW_S, as_of_us=int(read.received.max()))
    return read, dataset


def time_holdout(stored_at: I64) -> npt.NDArray[np.bool_]:
    """The rows `ml.train.train` judges on: from the first commit at or after 80%."""
    order = np.argsort(stored_at, kind="stable")
    cut = int(stored_at[order[int(len(order) * (1 - HOLDOUT_SHARE))]])
    return np.asarray(stored_at >= cut)


def single_features(dataset: Dataset, holdout: npt.NDArray[np.bool_]) -> dict[str, float]:
    """Each feature's own ROC AUC on the holdout (either way round)."""
    y = dataset.y[holdout]
    out = {}
    for column, name in enumerate(FEATURES):
        auc = float(roc_auc_score(y, dataset.X[holdout, column]))
        out[name] = round(max(auc, 1 - auc), 4)
    return out


# -- the seed's approach --------------------------------------------------------------


def whole_table_features(log_: _Log, window_s: float, cap_hours: float) -> F64:
    """The SEED'S LEAKY FEATURES, for comparison only: the five features of every
    operation computed from the whole log, its future included, as the seed system
    did. Never use these to train a model that serves.

    - `concurrent_editors`: distinct other users with an edit of the entity within W
      of this one, before or after it in time, whatever the commit order (the later
      edit that will collide with it is counted);
    - `hours_since_last_sync`: hours to the device's nearest other receipt, before or
      after (a stale backlog's nearest is the first online sync after it);
    - `user_conflict_rate`: (c + 1) / (n + 2) over all the user's operations, this one
      and the later ones included (its own label among them);
    - `entity_edit_frequency`: the entity's operations in the whole log;
    - `field_overlap_score`: the mean over its fields of members / operations of the
      (type, field) over the whole log (its own label among them).
    """
    n = len(log_.op_ids)
    window_us = round(window_s * 1_000_000)
    member = log_.joined != NEVER
    X = np.empty((n, len(FEATURES)), dtype=np.float64)

    # concurrent_editors: every pair of one entity's edits within W, both sides.
    first = int(log_.edited.min())
    span = int(log_.edited.max()) - first + 2 * window_us + 2
    key = log_.entity * span + (log_.edited - first + window_us)
    order = np.argsort(key, kind="stable")
    keys = key[order]
    lo = np.searchsorted(keys, key - window_us, side="left")
    hi = np.searchsorted(keys, key + window_us, side="right")
    sizes = hi - lo
    q = np.repeat(np.arange(n, dtype=np.int64), sizes)
    offset = np.arange(len(q), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    other = order[np.repeat(lo, sizes) + offset]
    kept = log_.user[other] != log_.user[q]
    users = int(log_.user.max()) + 1
    pairs = np.unique(q[kept] * users + log_.user[other[kept]])
    X[:, 0] = np.bincount(pairs // users, minlength=n)

    # hours_since_last_sync: the nearest other receipt of the device, either side.
    receipts = np.unique(np.stack([log_.device, log_.received], axis=1), axis=0)
    rspan = int(log_.received.max()) + 1
    rkeys = receipts[:, 0] * rspan + receipts[:, 1]
    at = np.searchsorted(rkeys, log_.device * rspan + log_.received)
    gap = np.full(n, np.inf)
    for neighbour in (at - 1, at + 1):
        valid = (neighbour >= 0) & (neighbour < len(rkeys))
        index = np.clip(neighbour, 0, len(rkeys) - 1)
        same = valid & (receipts[index, 0] == log_.device)
        distance = np.abs(receipts[index, 1] - log_.received).astype(np.float64)
        gap = np.where(same, np.minimum(gap, distance), gap)
    X[:, 1] = np.minimum(gap / HOUR_US, cap_hours)

    # user_conflict_rate over all the user's operations.
    ops = np.bincount(log_.user)
    conflicts = np.bincount(log_.user, weights=member)
    X[:, 2] = ((conflicts + 1.0) / (ops + 2.0))[log_.user]

    # entity_edit_frequency: the entity's operations in the whole log.
    X[:, 3] = np.bincount(log_.entity)[log_.entity]

    # field_overlap_score: members / operations of the (type, field), whole log.
    op = log_.field_op
    group = log_.entity_type[op] * (int(log_.field.max(initial=0)) + 1) + log_.field
    seen = np.bincount(group)
    hits = np.bincount(group, weights=member[op])
    ratio = (hits / np.maximum(seen, 1))[group]
    fields = np.bincount(op, minlength=n)
    total = np.bincount(op, weights=ratio, minlength=n)
    X[:, 4] = np.divide(total, fields, out=np.zeros(n), where=fields > 0)
    return X


def seed_forest(seed: int) -> RandomForestClassifier:
    """The forest of `ml.train` (same trees, depth, leaves and seed), fitted in one go."""
    return RandomForestClassifier(
        n_estimators=FOREST_TREES,
        min_samples_leaf=FOREST_MIN_LEAF,
        max_depth=FOREST_MAX_DEPTH,
        random_state=seed,
        n_jobs=-1,
    )


def seed_approach(
    log_: _Log, honest: Dataset, seed: int, as_of_us: int, holdout: npt.NDArray[np.bool_]
) -> dict[str, Any]:
    started = time.monotonic()
    leaky_all = whole_table_features(log_, WINDOW_S, DEFAULT_FIRST_SYNC_HOURS)
    # The rows extract keeps (window closed by the latest receipt), in the same order.
    keep = np.flatnonzero(log_.edited + round(WINDOW_S * 1_000_000) <= as_of_us)
    assert log_.op_ids[keep].tolist() == honest.op_ids, "rows differ from extract's"
    leaky = Dataset(X=leaky_all[keep], y=honest.y, stored_at=honest.stored_at, op_ids=honest.op_ids)
    log(f"whole-table features in {time.monotonic() - started:.1f} s")

    # What the seed would have reported: ml.train's stratified split, on leaky features.
    result = train(leaky, "random_forest", seed=seed, n_jobs=-1)
    log("the forest on whole-table features: trained (time-ordered and stratified)")

    # The same model again (the same split and forest), kept to be judged honestly.
    rows = len(honest)
    s_train, s_test = train_test_split(
        np.arange(rows), test_size=HOLDOUT_SHARE, stratify=honest.y, random_state=seed
    )
    forest = seed_forest(seed)
    forest.fit(
        leaky.X[s_train],
        leaky.y[s_train],
        sample_weight=compute_sample_weight("balanced", leaky.y[s_train]),
    )
    reproduced = metrics(leaky.y[s_test], forest.predict_proba(leaky.X[s_test])[:, 1])
    log("the seed's model refitted on its random 80%")

    unseen = np.zeros(rows, dtype=bool)
    unseen[s_test] = True
    # The same model on the same rows, fed what it learned from (whole-table features)
    # and what it would be served (point-in-time features): on the whole time-ordered
    # holdout, and on its part the model never saw (its random 20%).
    judged: dict[str, Any] = {}
    for name, rows_at in (("time_holdout", holdout), ("time_holdout_unseen", holdout & unseen)):
        judged[name] = {"rows": int(rows_at.sum())}
        for fed, X in (("point_in_time", honest.X), ("whole_table", leaky.X)):
            scores = forest.predict_proba(X[rows_at])[:, 1]
            judged[name][fed] = {
                **rounded(metrics(honest.y[rows_at], scores), "roc_auc", "pr_auc", "f1"),
                "mean_score": round(float(scores.mean()), 4),
            }
    means = {
        name: {
            "point_in_time": round(float(honest.X[holdout, column].mean()), 3),
            "whole_table": round(float(leaky.X[holdout, column].mean()), 3),
        }
        for column, name in enumerate(FEATURES)
    }
    return {
        "reported_stratified": {
            **rounded(result.metrics["stratified"], "roc_auc", "pr_auc", "f1"),
            "baseline_feature": result.baseline["feature"],
            "baseline_roc_auc": round(float(result.baseline["stratified"]["roc_auc"]), 4),
        },
        "reproduced_stratified_roc_auc": round(float(reproduced["roc_auc"]), 4),
        "leaky_time_holdout": {
            **rounded(result.metrics["holdout"], "roc_auc", "pr_auc", "f1"),
            "baseline_feature": result.baseline["feature"],
            "baseline_roc_auc": round(float(result.baseline["holdout"]["roc_auc"]), 4),
        },
        "importances": {k: round(v, 3) for k, v in result.metrics["importances"].items()},
        "single_features_stratified": single_features(leaky, unseen),
        "judged": judged,
        "holdout_feature_means": means,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = causal_url(args.workdir, args.ops)
    await build(url, args.ops, log)
    engine = create_engine(url)
    try:
        started = time.monotonic()
        log_, dataset = await read_dataset(engine)
        as_of = int(log_.received.max())
        positives = int(dataset.y.sum())
        log(
            f"{len(dataset):,} rows, {positives:,} conflict members "
            f"({100 * positives / len(dataset):.1f}%), read and extracted in "
            f"{time.monotonic() - started:.1f} s"
        )
        holdout = time_holdout(dataset.stored_at)
        params = TrainParams(
            models_dir=args.workdir / "models", window_s=WINDOW_S, seed=args.seed, n_jobs=-1
        )
        results: dict[str, Any] = {
            "ops": args.ops,
            "rows": len(dataset),
            "positives": positives,
            "hours": round((int(log_.edited.max()) - int(log_.edited.min())) / HOUR_US, 1),
            "seed": args.seed,
            "single_features_holdout": single_features(dataset, holdout),
        }
        forest = await train_one(engine, dataset, "random_forest", params)
        results["random_forest"] = figures(forest)
        assert forest.file_path is not None
        written = write_report(
            forest, registry.load_holdout(forest.file_path), args.workdir / "report"
        )
        results["report"] = str(written[-1])
        log(f"report: {written[-1]}")
        logistic = await train_one(engine, dataset, "logistic_regression", params)
        results["logistic_regression"] = figures(logistic)
        if not args.skip_seed:
            results["seed_approach"] = seed_approach(log_, dataset, args.seed, as_of, holdout)
    finally:
        await engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fg-ml-quality"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and forests")
    parser.add_argument(
        "--skip-seed", action="store_true", help="leave out the seed approach's comparison"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
