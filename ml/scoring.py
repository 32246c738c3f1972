"""Online scoring: the active model's risk for every operation as it is stored.

The engine's sync step calls `Scorer.score` inside the transaction that stores a
batch, after the versions are assigned (the entities locked) and before detection
bumps the counters: the features are read from the counters as committed before
this batch (storage/feature_counters.py) in five statements, computed in one pass,
and scored with one call of the served model for the whole batch. They are the numbers
`ml.features.extract` computes for training (the skew test holds them equal).

Operations at or above `ml.hint_threshold` also get their two strongest reasons:
each feature in turn set to its neutral value (no other editor, just synced, an
unknown user, a quiet entity, fields never in conflict), all of them in one more
call; the features whose neutral value lowers the risk most are the
reasons (docs/decisions/0012-hint-reasons.md).

The scorer follows the registry: it asks which model is active at most every
`REFRESH_S` (and `preload`s it at the engine's start and when the MQTT process
says a model was activated), and loads a new one's served form with
`ml.serving.load`, both files' hashes checked: plain arrays, so the engine never
imports scikit-learn (a model without its served form, registered before they
existed or restored without it, is read from its skops file with
`ml.registry.load` and converted at load). A file that is
refused leaves scoring off, logged once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.records import OpRecord
from handlers.times import HOUR_US
from ml import serving
from ml.dataset import DEFAULT_FIRST_SYNC_HOURS, FEATURES
from ml.serving import ModelRefused
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
        editors = 0
        for slot, users in snapshot.editors.get(key, {}).items():
            if lo <= slot <= hi:
                editors |= users
        editors &= ~snapshot.user_bits.get(record.user_id, 0)
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
            float(editors.bit_count()),
            hours,
            (members + 1.0) / (ops + 2.0),
            float(frequency),
            sum(ratios) / len(ratios) if ratios else 0.0,
        )
    return X


def reasons(model: serving.Model, X: F64, risks: F64) -> list[tuple[str, ...]]:
    """Per row, the REASONS features whose neutral value lowers its risk most (one
    call of the model for every row and feature at once)."""
    neutral = np.asarray(NEUTRAL)
    # A feature whose neutral value cannot change the score (already neutral, or, in
    # a forest, no threshold between the two) lowers it by exactly 0: no probe.
    moves = np.column_stack(
        [model.changes(j, X[:, j], float(neutral[j])) for j in range(X.shape[1])]
    )
    rows, columns = np.nonzero(moves)
    lowered = np.zeros(X.shape, dtype=np.float64)
    if len(rows):
        probes = X[rows]
        probes[np.arange(len(rows)), columns] = neutral[columns]
        lowered[rows, columns] = risks[rows] - model(probes)
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
        self.model: serving.Model | None = None
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
        process says a model was activated (its answer waits for this). A model
        older than its served form takes a second to import and load, which a
        batch's transaction would otherwise hold the database for."""
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

    def _take(self, found: ml_models.ActiveFile | None) -> None:
        """Score with the model `found` active from now on (None: no model)."""
        if found is None:
            if self.model_id is not None:
                log.info("no model active: operations are no longer scored")
            self.model, self.model_id, self.refused = None, None, None
            return
        if found.model_id == self.model_id:
            return
        self.model_id = found.model_id
        try:
            model = serving.load(found.file_path, found.sha256, found.serving_sha256)
        except ModelRefused as exc:
            self.model, self.refused = None, exc.reason
            log.error(
                "the active model is refused: operations are not scored",
                model_id=found.model_id,
                reason=exc.reason,
            )
            return
        self.model, self.refused = model, None
        log.info("scoring with model", model_id=found.model_id)
