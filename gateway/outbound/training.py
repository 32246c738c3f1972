"""Training runs and their schedule: one run at a time, in a worker process; an
activation only of a model whose file loads.

`Trainer` is what `ml/train` and `ml/activate` call and what the schedule shares:
the run (extraction included) is a worker process of its own (ml/pipeline.py), so
that its minutes of CPU and its memory never slow ingest. scikit-learn is imported
on the first run, not at the daemon's start: most daemons never train, and the MQTT
process stays small. A model that becomes ready is announced in the transaction
that marks it (`model.trained` on `<root>/ml/models`, and to webhooks that
subscribe).

`Retraining` trains every `ml.retrain_interval_s` (counted from the latest run,
whoever started it) and activates the new model only when it does better than the
active one on the same operations (the new model's holdout), or, with none active,
better than the best single feature. One instance's schedule is its own: several
instances on one database each train on it.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import Settings
from gateway.ingest import rules
from gateway.lifecycle import Loop
from handlers.admin import Progress
from handlers.records import OutboxRecord
from handlers.times import now_us, rfc3339
from storage import ml_models
from storage.ml_models import ModelRow, UnknownModel, WrongStatus, shown

log = structlog.get_logger("fieldgate.training")

_encode = msgspec.json.Encoder().encode

EXTRACT_SHARE = 40
"""Of the 100 steps a run reports, what the extraction takes; training the rest."""
IDLE_LOOK_S = 60.0
"""How often the schedule looks again while it is off or a run is under way."""


class Busy(Exception):
    """A training run is under way already."""


class Refused(Exception):
    """A model that will not be activated, and why (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def trained_notices(root: str, events: frozenset[str], row: ModelRow) -> list[OutboxRecord]:
    """`model.trained` on `<root>/ml/models`, and for webhooks when one subscribes."""
    body = _encode({"event": "model.trained", "model": shown(row)})
    out = [OutboxRecord(channel="mqtt", topic=f"{root}/ml/models", payload=body)]
    if "model.trained" in events:
        out.append(OutboxRecord(channel="webhook", event_type="model.trained", payload=body))
    return out


class Run:
    """The training run under way: what `ml/status` says of it."""

    def __init__(self, algorithm: str, scheduled: bool) -> None:
        self.algorithm = algorithm
        self.scheduled = scheduled
        self.started_at = now_us()
        self.started = time.monotonic()
        self.stage = "starting"
        self.done = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "scheduled": self.scheduled,
            "started_at": rfc3339(self.started_at),
            "running_s": round(time.monotonic() - self.started, 1),
            "stage": self.stage,
            "done": self.done,
            "total": 100,
        }


class Trainer:
    def __init__(
        self,
        database: AsyncEngine,
        settings: Callable[[], Settings],
        poke: Callable[[], None],
        activated: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.poke = poke
        """The outbox has the announcement of a new model."""
        self.activated = activated
        """A model was activated: returns once this instance's engine scores with it."""
        self.run: Run | None = None

    async def train(
        self,
        algorithm: str | None,
        since_us: int | None,
        progress: Progress | None = None,
        *,
        incumbent: ModelRow | None = None,
    ) -> ModelRow:
        """One run to its end: the model's row, `ready` or `failed`. Raises Busy while
        another runs. `progress(done, total)`: of 100, in order."""
        if self.run is not None:
            raise Busy()
        settings = self.settings()
        run = self.run = Run(algorithm or settings.ml.algorithm, incumbent is not None)
        try:
            row = await self._train(settings, run, since_us, progress, incumbent)
        finally:
            self.run = None
        if row.status == "ready":
            self.poke()
        log.info("training run ended", model_id=row.id, status=row.status)
        return row

    async def _train(
        self,
        settings: Settings,
        run: Run,
        since_us: int | None,
        progress: Progress | None,
        incumbent: ModelRow | None,
    ) -> ModelRow:
        # The first run imports scikit-learn, pandas and skops (1.8 s measured in the
        # soak): on a thread, not on the event loop that reads and answers MQTT.
        await asyncio.to_thread(importlib.import_module, "ml.pipeline")
        from ml.pipeline import params_from_settings, train_and_register
        from ml.worker import Incumbent

        def step(stage: str, done: int, total: int) -> None:
            share = (0, EXTRACT_SHARE) if stage == "extract" else (EXTRACT_SHARE, 100)
            value = share[0] + (share[1] - share[0]) * done // max(total, 1)
            run.stage = stage
            if value > run.done:
                run.done = value
                if progress is not None:
                    progress(value, 100)

        judged = None
        if incumbent is not None and incumbent.file_path and incumbent.sha256:
            judged = Incumbent(incumbent.id, incumbent.file_path, incumbent.sha256)
        params = params_from_settings(
            settings, algorithm=run.algorithm, since_us=since_us, incumbent=judged
        )
        events = rules.webhook_events(settings)
        root = settings.mqtt.topic_root
        return await train_and_register(
            self.database,
            params,
            step,
            in_process=True,
            database_url=settings.database.url,
            announce=lambda row: trained_notices(root, events, row),
        )

    async def activate(self, model_id: str) -> ModelRow:
        """Make a ready model the active one, after its served form loaded as the
        engine will load it (ml.serving.load: the hashes): a refused file leaves the
        active model as it was. Raises Refused."""
        from ml.serving import ModelRefused, load

        row = await ml_models.get(self.database, model_id)
        if row is None:
            raise Refused(f"no model {model_id}")
        if row.status not in ("ready", "active") or row.file_path is None or row.sha256 is None:
            raise Refused(f"model {row.id} is {row.status}: only a ready model")
        try:
            await asyncio.to_thread(load, row.file_path, row.sha256, row.serving_sha256)
        except ModelRefused as exc:
            raise Refused(f"model {row.id} refused: {exc.reason}") from None
        try:
            row = await ml_models.activate(self.database, row.id)
        except (UnknownModel, WrongStatus) as exc:
            raise Refused(str(exc)) from None
        log.info("model activated", model_id=row.id)
        if self.activated is not None:
            await self.activated()
        return row


def better(row: ModelRow, incumbent: ModelRow | None) -> tuple[bool, str]:
    """Whether a scheduled model should replace the active one, and why (a line for
    the log): a higher holdout ROC AUC than the incumbent's on the same holdout, or,
    with no incumbent, than the best single feature's."""
    held = (row.metrics or {}).get("holdout") or {}
    if incumbent is None:
        base = ((row.baseline_metrics or {}).get("holdout") or {}).get("roc_auc")
        if base is None or held.get("roc_auc") is None:
            return False, "no figures to compare"
        return held["roc_auc"] > base, f"ROC AUC {held['roc_auc']:.3f}, baseline {base:.3f}"
    judged = (row.metrics or {}).get("incumbent") or {}
    if "refused" in judged:
        return True, f"the active model's file is refused: {judged['refused']}"
    theirs = judged.get("roc_auc")
    if theirs is None or held.get("roc_auc") is None:
        return False, "no figures to compare"
    return (
        held["roc_auc"] > theirs,
        f"ROC AUC {held['roc_auc']:.3f}, active {incumbent.id} {theirs:.3f} on the same holdout",
    )


class Retraining(Loop):
    name = "retraining"

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer

    async def round(self) -> float:
        interval_s = self.trainer.settings().ml.retrain_interval_s
        if interval_s <= 0 or self.trainer.run is not None:
            return IDLE_LOOK_S
        database = self.trainer.database
        latest = await ml_models.list_models(database, limit=1)
        if latest:
            due_in_s = (latest[0].created_at - now_us()) / 1e6 + interval_s
            if due_in_s > 0:
                return min(due_in_s, IDLE_LOOK_S)
        incumbent = await ml_models.active(database)
        try:
            row = await self.trainer.train(None, None, incumbent=incumbent)
        except Busy:
            return IDLE_LOOK_S
        if row.status != "ready":
            log.warning("scheduled training failed", model_id=row.id, reason=row.failure_reason)
            return interval_s
        replace, why = better(row, incumbent)
        if replace:
            try:
                await self.trainer.activate(row.id)
            except Refused as exc:
                replace, why = False, exc.reason
        log.info("scheduled model", model_id=row.id, activated=replace, why=why)
        return interval_s
