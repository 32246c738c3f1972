"""Training a conflict model honestly: judged on the future it did not see, against the
best single feature.

- **Time-ordered holdout**: the model learns from the operations committed first and
  is judged on the latest 20% (by `stored_at`, never splitting one commit). A
  deployed model always scores operations later than everything it learned from;
  a random split lets it learn from the neighbours, in time, of the rows it is
  judged on (the same hot entity, the same burst of a careless user), and flatters
  it. Its metrics are the ones reported and compared; the stratified split's are
  computed too, and labelled so, to show the difference.
- **Baseline**: the single feature that ranks the training part best, turned into a
  probability by a one-feature logistic regression (a monotone map: its ROC and PR
  AUC are the feature's own, and its 0.5 cut is made like the models'). A model that
  does not beat it has learned nothing the feature did not say alone.
- **Imbalance**: conflicts are few, so both classes weigh the same in the fit
  (balanced weights); a 0.5 cut then means "more like a conflict member than not".

Pure: arrays in, a fitted Pipeline and numbers out, no database and no files, so it
can run in a worker process (ml/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_sample_weight

from ml.dataset import FEATURES, Dataset
from storage.ml_models import DataWindow

Algorithm = Literal["random_forest", "logistic_regression"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)

HOLDOUT_SHARE = 0.2
DEFAULT_MIN_ROWS = 1000
"""Fewer rows than this (`ml.min_rows`) and the holdout is too small to say anything."""
THRESHOLD = 0.5
"""The cut of the thresholded metrics (accuracy, precision, recall, F1)."""

FOREST_TREES = 50
"""With FOREST_MAX_DEPTH, sized for scoring every commit batch: on the causal
scenario's holdout (benchmarks.ml_quality), 50 trees of depth 12 score ROC AUC 0.869
against 0.867 for 100 of depth 16, and the engine walks them ~4x faster (4 against
14-19 us a row): the walk is most of what scoring costs the drain."""
FOREST_STEP = 10
"""Trees grown between two progress reports (and cancellation checks)."""
FOREST_MIN_LEAF = 20
"""Leaves of at least this many rows: smoother probabilities, and a model small and
fast enough to score every commit batch."""
FOREST_MAX_DEPTH = 12

METRICS: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "pr_auc",
    "confusion_matrix",
)
"""The keys of every metrics dict; `confusion_matrix` is [[tn, fp], [fn, tp]]."""

Progress = Callable[[str, int, int], None]
"""(stage, steps done, steps in all)."""
Cancelled = Callable[[], bool]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int8]


class TrainingFailed(Exception):
    """Training ended without a model; `reason` is the sentence the registry keeps."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Holdout:
    """The time-ordered holdout's labels and both scores: what the report draws, kept
    beside the model file so that it is drawn from what was measured, not re-extracted
    (labels change as conflicts grow)."""

    y: IntArray
    model_scores: FloatArray
    baseline_scores: FloatArray


@dataclass(frozen=True)
class TrainResult:
    algorithm: Algorithm
    seed: int
    pipeline: Pipeline
    """Fitted on the part before the holdout: the model judged is the model saved."""
    window: DataWindow
    metrics: dict[str, Any]
    """`holdout` and `stratified` (METRICS each), `importances` (per feature, sum 1)."""
    baseline: dict[str, Any]
    """`feature` (its name), `holdout` and `stratified` (METRICS each)."""
    holdout: Holdout

    @property
    def beats_baseline(self) -> bool:
        return beats_baseline(self.metrics, self.baseline)


def beats_baseline(metrics: dict[str, Any], baseline: dict[str, Any]) -> bool:
    """The verdict: a higher holdout ROC AUC than the best single feature's."""
    return bool(metrics["holdout"]["roc_auc"] > baseline["holdout"]["roc_auc"])


def train(
    dataset: Dataset,
    algorithm: Algorithm,
    *,
    seed: int,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
    n_jobs: int = 1,
) -> TrainResult:
    """Fit `algorithm` on the first 80% of `dataset` in time and judge it on the rest.

    Raises TrainingFailed: too few rows, one class only (in all, in the training part
    or in the holdout), or `cancelled()` turned true (checked between steps).
    `n_jobs`: cores for the forest; 1 in the daemon, whose ingest needs the others.
    """
    if algorithm not in ALGORITHMS:
        raise TrainingFailed(f"unknown algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    rows = len(dataset)
    if rows < min_rows:
        raise TrainingFailed(
            f"too few rows: {rows} operations with a closed window, {min_rows} needed (ml.min_rows)"
        )
    X, y = dataset.X.astype(np.float64), dataset.y.astype(np.int8)
    _two_classes(y, f"all {rows} operations")
    train_at, hold_at, holdout_from = _time_split(dataset.stored_at)
    _two_classes(y[train_at], f"the training part (the first {len(train_at)} operations)")
    _two_classes(y[hold_at], f"the holdout (the latest {len(hold_at)} operations)")

    steps = _Steps(algorithm, progress, cancelled)
    feature, baseline = _baseline(X[train_at], y[train_at])
    steps.done("baseline")
    model = _fit(algorithm, X[train_at], y[train_at], seed, n_jobs, steps, "model")
    model_scores = _scores(model, X[hold_at])
    baseline_scores = _scores(baseline, X[hold_at][:, [feature]])

    s_train, s_test = train_test_split(
        np.arange(rows), test_size=HOLDOUT_SHARE, stratify=y, random_state=seed
    )
    s_feature, s_baseline = _baseline(X[s_train], y[s_train])
    s_model = _fit(algorithm, X[s_train], y[s_train], seed, n_jobs, steps, "stratified model")
    steps.done("metrics")

    stored_at = dataset.stored_at
    return TrainResult(
        algorithm=algorithm,
        seed=seed,
        pipeline=model,
        window=DataWindow(
            since_us=int(stored_at.min()),
            until_us=int(stored_at.max()),
            holdout_from_us=holdout_from,
            train_rows=len(train_at),
            holdout_rows=len(hold_at),
            train_positives=int(y[train_at].sum()),
            holdout_positives=int(y[hold_at].sum()),
        ),
        metrics={
            "holdout": metrics(y[hold_at], model_scores),
            "stratified": metrics(y[s_test], _scores(s_model, X[s_test])),
            "importances": importances(model),
        },
        baseline={
            "feature": FEATURES[feature],
            "holdout": metrics(y[hold_at], baseline_scores),
            "stratified": metrics(y[s_test], _scores(s_baseline, X[s_test][:, [s_feature]])),
        },
        holdout=Holdout(y=y[hold_at], model_scores=model_scores, baseline_scores=baseline_scores),
    )


def metrics(y: IntArray, scores: FloatArray) -> dict[str, Any]:
    """METRICS of `scores` (probabilities of a conflict) against the labels `y`; PR
    AUC is the average precision (the step-wise area, not a trapezoid that would
    interpolate optimistically)."""
    predicted = (scores >= THRESHOLD).astype(np.int8)
    return {
        "accuracy": float(accuracy_score(y, predicted)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(y, scores)),
        "pr_auc": float(average_precision_score(y, scores)),
        "confusion_matrix": confusion_matrix(y, predicted, labels=[0, 1]).tolist(),
    }


def importances(pipeline: Pipeline) -> dict[str, float]:
    """How much each feature weighs in the model, summing to 1: the forest's impurity
    importances; for the logistic regression, |coefficient| on the scaled features
    (comparable because each feature has unit variance)."""
    final = pipeline[-1]
    if isinstance(final, RandomForestClassifier):
        weights = np.asarray(final.feature_importances_, dtype=np.float64)
    else:
        weights = np.abs(np.asarray(final.coef_, dtype=np.float64)[0])
    total = float(weights.sum())
    shares = weights / total if total > 0 else weights
    return {name: float(value) for name, value in zip(FEATURES, shares, strict=True)}


def _two_classes(y: IntArray, where: str) -> None:
    positives = int(y.sum())
    if positives == 0:
        raise TrainingFailed(f"one class only: no conflict member in {where}")
    if positives == len(y):
        raise TrainingFailed(f"one class only: every operation is a conflict member in {where}")


def _time_split(
    stored_at: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], int]:
    """Indices before and from the cut, and the cut's time: the first commit at or after
    80% of the rows, so that one commit's operations (which do not see each other)
    stay on one side."""
    order = np.argsort(stored_at, kind="stable")
    cut = int(stored_at[order[int(len(order) * (1 - HOLDOUT_SHARE))]])
    train_at = np.flatnonzero(stored_at < cut)
    hold_at = np.flatnonzero(stored_at >= cut)
    if len(train_at) == 0:
        raise TrainingFailed(
            "no time to split: the latest 20% of operations were committed at the first commit time"
        )
    return train_at, hold_at, cut


def _baseline(X: FloatArray, y: IntArray) -> tuple[int, Pipeline]:
    """The feature whose values rank `y` best (either way round), first in FEATURES
    order on a tie, and its one-feature model."""

    def strength(column: int) -> float:
        auc = float(roc_auc_score(y, X[:, column]))
        return max(auc, 1 - auc)

    feature = max(range(X.shape[1]), key=strength)
    model = _logistic()
    model.fit(X[:, [feature]], y)
    return feature, model


def _logistic() -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("logistic", LogisticRegression(class_weight="balanced", max_iter=1000)),
        ]
    )


class _Steps:
    """Progress in steps of equal promise (a forest's trees come in FOREST_STEP
    chunks), and the cancellation check between them."""

    def __init__(
        self, algorithm: Algorithm, progress: Progress | None, cancelled: Cancelled | None
    ) -> None:
        fits = FOREST_TREES // FOREST_STEP if algorithm == "random_forest" else 1
        self.total = 2 + 2 * fits
        self.count = 0
        self.progress = progress
        self.cancelled = cancelled

    def done(self, stage: str) -> None:
        if self.cancelled is not None and self.cancelled():
            raise TrainingFailed("cancelled")
        self.count += 1
        if self.progress is not None:
            self.progress(stage, self.count, self.total)


def _fit(
    algorithm: Algorithm,
    X: FloatArray,
    y: IntArray,
    seed: int,
    n_jobs: int,
    steps: _Steps,
    stage: str,
) -> Pipeline:
    if algorithm == "logistic_regression":
        model = _logistic()
        model.fit(X, y)
        steps.done(stage)
        return model
    # Grown FOREST_STEP trees at a time (warm start) to report and to stop between;
    # balanced sample weights rather than class_weight, which sklearn warns against
    # with a warm start (the weights are the same: computed once on all of `y`).
    forest = RandomForestClassifier(
        n_estimators=0,
        min_samples_leaf=FOREST_MIN_LEAF,
        max_depth=FOREST_MAX_DEPTH,
        random_state=seed,
        n_jobs=n_jobs,
        warm_start=True,
    )
    model = Pipeline([("forest", forest)])
    weights = compute_sample_weight("balanced", y)
    for trees in range(FOREST_STEP, FOREST_TREES + 1, FOREST_STEP):
        forest.set_params(n_estimators=trees)
        model.fit(X, y, forest__sample_weight=weights)
        steps.done(stage)
    forest.set_params(warm_start=False)
    return model


def _scores(model: Pipeline, X: FloatArray) -> FloatArray:
    return np.asarray(model.predict_proba(X)[:, 1], dtype=np.float64)
