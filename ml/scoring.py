"""Online scoring: the active model's risk for every operation as it is stored.

The engine's sync step calls `Scorer.score` inside the transaction that stores a
batch, after the versions are assigned (the entities locked) and before detection
bumps the counters: the features are read from the counters as committed before
this batch (storage/feature_counters.py) in five statements, computed in one pass,
and scored with one `predict_proba` for the whole batch. They are the numbers
`ml.features.extract` computes for training (the skew test holds them equal).

Operations at or above `ml.hint_threshold` also get their two strongest reasons:
each feature in turn set to its neutral value (no other editor, just synced, an
unknown user, a quiet entity, fields never in conflict), all of them in one more
`predict_proba`; the features whose neutral value lowers the risk most are the
reasons (docs/decisions/0012-hint-reasons.md).

The scorer follows the registry: it asks which model is active at most every
`REFRESH_S` (and `preload`s it at the engine's start and when the MQTT process
says a model was activated), and loads a new one with `ml.registry.load`, hash
and types checked. A file that is refused leaves scoring off, logged once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.records import OpRecord
from handlers.times import HOUR_US
from ml.dataset import DEFAULT_FIRST_SYNC_HOURS, FEATURES
from storage import feature_counters, ml_models
from storage.feature_counters import Snapshot, counted_field, hour_range, slot_range

log = structlog.get_logger("fieldgate.scoring")

F64 = npt.NDArray[np.float64]

REFRESH_S = 5.0
"""How often the scorer asks the registry which model is active (another instance's
activation reaches this one within it)."""

NEUTRAL: tuple[float, ...] = (0.0, 0.0, 0.5, 0.0, 0.0)
"""Per feature (FEATURES' order), the value that says nothing of a conflict: the
reference a hint's reasons are measured against."""

REASONS = 2


def serving_features(
    records: Sequence[OpRecord],
    snapshot: Snapshot,
    *,
    window_us: int,
    first_sync_hours: float = DEFAULT_FIRST_SYNC_HOURS,
) -> F64:
    """The five features of each record (FEATURES' order) from the counters committed
    before its batch: ml/dataset.py's definitions, one record at a time."""
    X = np.empty((len(records), len(FEATURES)), dtype=np.float64)
    for row, record in enumerate(records):
        key = (record.entity_type, record.entity_id)
        lo, hi = slot_range(record.edited_at_us, window_us)
        editors: set[str] = set()
        for slot, users in snapshot.editors.get(key, {}).items():
            if lo <= slot <= hi:
                editors.update(users)
        editors.discard(record.user_id)
        latest = snapshot.devices.get(record.device_id)
        if latest is None:
            hours = first_sync_hours
        else:
            gap = (record.received_at_us - latest) / HOUR_US
            hours = min(max(gap, 0.0), first_sync_hours)
        ops, members = snapshot.users.get(record.user_id, (0, 0))
        first, last = hour_range(record.edited_at_us)
        frequency = sum(
            n for hour, n in snapshot.hours.get(key, {}).items() if first <= hour <= last
        )
        ratios = []
        for name in map(counted_field, record.changes):
            seen, joined = snapshot.fields.get((record.entity_type, name), (0, 0))
            ratios.append(joined / seen if seen else 0.0)
        X[row] = (
            float(len(editors)),
            hours,
            (members + 1.0) / (ops + 2.0),
            float(frequency),
            sum(ratios) / len(ratios) if ratios else 0.0,
        )
    return X


class Predictor:
    """The model's probability of a conflict for each row: `predict_proba(X)[:, 1]`.

    A forest alone in its Pipeline (ml/train.py's `random_forest`) is summed tree by
    tree here, without the joblib dispatch scikit-learn wraps around each tree: the
    same arithmetic in the same order, at less than half the cost for a batch
    (measured: 9 against 21 ms for 1,000 rows). It is used only if it gives exactly
    `predict_proba`'s numbers on a probe of the features' ranges when the model is
    loaded; otherwise, and for the logistic regression, `predict_proba` is called.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._trees: list[Any] | None = None
        final = model[-1]
        if len(model) == 1 and type(final).__name__ == "RandomForestClassifier":
            trees = [estimator.tree_ for estimator in final.estimators_]
            probe = np.random.default_rng(0).uniform(0, 1, (256, len(FEATURES))) * _RANGES
            if np.array_equal(self._forest(trees, probe), model.predict_proba(probe)):
                self._trees = trees

    @staticmethod
    def _forest(trees: list[Any], X: F64) -> F64:
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        total = np.zeros((len(X32), 2), dtype=np.float64)
        for tree in trees:
            total += tree.predict(X32)
        total /= len(trees)
        return total

    def __call__(self, X: F64) -> F64:
        if self._trees is not None:
            return self._forest(self._trees, X)[:, 1]
        probabilities: F64 = self.model.predict_proba(X)[:, 1]
        return probabilities


_RANGES = np.array([20.0, 200.0, 1.0, 500.0, 1.0])
"""Per feature, the span of the probe that checks the fast path: past every value
the features take in practice (counts, hours up to the cap, rates and shares)."""


def reasons(predict: Callable[[F64], F64], X: F64, risks: F64) -> list[tuple[str, ...]]:
    """Per row, the REASONS features whose neutral value lowers its risk most (one
    `predict_proba` for every row and feature at once)."""
    neutral = np.asarray(NEUTRAL)
    # A feature already at its neutral value lowers nothing: no probe for it.
    rows, columns = np.nonzero(np.not_equal(X, neutral))
    lowered = np.zeros(X.shape, dtype=np.float64)
    if len(rows):
        probes = X[rows]
        probes[np.arange(len(rows)), columns] = neutral[columns]
        lowered[rows, columns] = risks[rows] - predict(probes)
    # Largest drop first; ties in FEATURES' order.
    order = np.argsort(-lowered, axis=1, kind="stable")[:, :REASONS]
    return [tuple(FEATURES[j] for j in row) for row in order]


class Scorer:
    """The active model, kept loaded in the engine process (storage.sync.Scoring)."""

    def __init__(
        self,
        *,
        window_s: float,
        first_sync_hours: float = DEFAULT_FIRST_SYNC_HOURS,
        hint_threshold: float = 0.7,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.configure(
            window_s=window_s, first_sync_hours=first_sync_hours, hint_threshold=hint_threshold
        )
        self.refresh_s = refresh_s
        self.model: Predictor | None = None
        self.model_id: str | None = None
        """The active model's id as last seen (also when its file was refused)."""
        self.refused: str | None = None
        """Why the active model's file was refused; None when it loaded (or none)."""
        self._checked_at: float | None = None

    def configure(self, *, window_s: float, first_sync_hours: float, hint_threshold: float) -> None:
        """The settings it scores by (`conflicts.window_s`, `ml.*`), at start and reload."""
        self.window_us = round(window_s * 1_000_000)
        self.first_sync_hours = first_sync_hours
        self.hint_threshold = hint_threshold

    async def score(self, conn: AsyncConnection, stored: Sequence[OpRecord]) -> None:
        """Set `risk` of every record in `stored` and `reasons` of those at or above the
        threshold; nothing when no model is active."""
        checked = self._checked_at
        if checked is None or time.monotonic() - checked >= self.refresh_s:
            await self._follow(conn)
        if self.model is None or not stored:
            return
        X = await self.features(conn, stored)
        risks = self.model(X)
        for record, risk in zip(stored, risks.tolist(), strict=True):
            record.risk = round(risk, 4)
        hinted = np.flatnonzero(risks >= self.hint_threshold)
        if len(hinted):
            for at, why in zip(
                hinted.tolist(), reasons(self.model, X[hinted], risks[hinted]), strict=True
            ):
                stored[at].reasons = why

    async def features(self, conn: AsyncConnection, stored: Sequence[OpRecord]) -> F64:
        """The features of `stored` (FEATURES' order), from the counters as committed
        before their batch."""
        snapshot = await feature_counters.snapshot(conn, stored, self.window_us)
        return serving_features(
            stored, snapshot, window_us=self.window_us, first_sync_hours=self.first_sync_hours
        )

    async def preload(self, database: AsyncEngine) -> None:
        """Load the active model now, off the event loop: at start, and when the MQTT
        process says a model was activated (its answer waits for this). A forest
        takes a second to import and load, which a batch's transaction would
        otherwise hold the database for."""
        try:
            async with database.connect() as conn:
                found = await ml_models.active_file(conn)
        except (DBAPIError, OSError) as exc:
            # The database is away: the next batch asks again, under its retries.
            log.warning("the active model could not be looked up", error=type(exc).__name__)
            self._checked_at = None
            return
        self._checked_at = time.monotonic()
        await asyncio.to_thread(self._take, found)

    async def _follow(self, conn: AsyncConnection) -> None:
        self._checked_at = time.monotonic()
        self._take(await ml_models.active_file(conn))

    def _take(self, found: tuple[str, str, str] | None) -> None:
        """Score with the model `found` active from now on (None: no model)."""
        if found is None:
            if self.model_id is not None:
                log.info("no model active: operations are no longer scored")
            self.model, self.model_id, self.refused = None, None, None
            return
        model_id, path, sha256 = found
        if model_id == self.model_id:
            return
        from ml.registry import ModelRefused, load

        self.model_id = model_id
        try:
            model = load(path, sha256)
        except ModelRefused as exc:
            self.model, self.refused = None, exc.reason
            log.error(
                "the active model is refused: operations are not scored",
                model_id=model_id,
                reason=exc.reason,
            )
            return
        if "n_jobs" in model[-1].get_params():
            # One batch is a few hundred rows: threads for it cost more than they
            # save, and the engine's core is the one they would take.
            model[-1].set_params(n_jobs=1)
        self.model, self.refused = Predictor(model), None
        log.info("scoring with model", model_id=model_id)
