"""`ml/train`, `ml/status`, `ml/models`, `ml/activate`: conflict prediction's registry.

Training is a long command: it answers `accepted`, reports progress, and answers
with the model. The run (extraction included) is a worker process of its own
(ml/pipeline.py), so that its minutes of CPU and its memory never slow ingest; one
runs at a time. scikit-learn is imported on the first run, not at the daemon's
start: most daemons never train, and the MQTT process stays small.

A model that becomes ready is announced in the same transaction (`model.trained`,
on `<root>/ml/models` and to webhooks that subscribe): docs/ml.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import CommandError, NoArgs, invalid, us
from gateway.admin.server import Command
from gateway.config import Settings
from gateway.ingest import rules
from handlers.admin import Progress
from handlers.errors import Code
from handlers.fields import AwareTime, Str64
from handlers.records import OutboxRecord
from handlers.times import now_us, rfc3339
from storage import ml_models
from storage.ml_models import ModelRow, UnknownModel, WrongStatus, shown

log = structlog.get_logger("fieldgate.admin.ml")

_encode = msgspec.json.Encoder().encode

EXTRACT_SHARE = 40
"""Of the 100 steps `ml/train` reports, what the extraction takes; training the rest."""


class TrainArgs(msgspec.Struct, forbid_unknown_fields=True):
    algorithm: Literal["random_forest", "logistic_regression"] | None = None
    since: AwareTime | None = None


class ActivateArgs(msgspec.Struct, forbid_unknown_fields=True):
    model_id: Str64


def trained_notices(root: str, events: frozenset[str], row: ModelRow) -> list[OutboxRecord]:
    """`model.trained` on `<root>/ml/models`, and for webhooks when one subscribes."""
    body = _encode({"event": "model.trained", "model": shown(row)})
    out = [OutboxRecord(channel="mqtt", topic=f"{root}/ml/models", payload=body)]
    if "model.trained" in events:
        out.append(OutboxRecord(channel="webhook", event_type="model.trained", payload=body))
    return out


class Run:
    """The training run under way: what `ml/status` says of it."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self.started_at = now_us()
        self.started = time.monotonic()
        self.stage = "starting"
        self.done = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "started_at": rfc3339(self.started_at),
            "running_s": round(time.monotonic() - self.started, 1),
            "stage": self.stage,
            "done": self.done,
            "total": 100,
        }


class MlCommands:
    def __init__(
        self, database: AsyncEngine, settings: Callable[[], Settings], poke: Callable[[], None]
    ) -> None:
        self.database = database
        self.settings = settings
        self.poke = poke
        """The outbox has the announcement of a new model."""
        self.run: Run | None = None

    def commands(self) -> list[Command]:
        return [
            Command("ml/train", self.train, TrainArgs, long=True, writes=True),
            Command("ml/status", self.status),
            Command("ml/models", self.models),
            Command("ml/activate", self.activate, ActivateArgs, writes=True),
        ]

    async def train(self, args: TrainArgs, progress: Progress) -> dict[str, Any]:
        if self.run is not None:
            raise CommandError(
                Code.UNAVAILABLE, "a training run is under way (ml/status): ask again after it"
            )
        settings = self.settings()
        algorithm = args.algorithm or settings.ml.algorithm
        run = self.run = Run(algorithm)
        try:
            row = await self._train(settings, algorithm, us(args.since), run, progress)
        finally:
            self.run = None
        if row.status == "ready":
            self.poke()
        log.info("training run ended", model_id=row.id, status=row.status)
        return {"model": shown(row)}

    async def _train(
        self, settings: Settings, algorithm: str, since_us: int | None, run: Run, progress: Progress
    ) -> ModelRow:
        from ml.pipeline import params_from_settings, train_and_register

        def step(stage: str, done: int, total: int) -> None:
            share = (0, EXTRACT_SHARE) if stage == "extract" else (EXTRACT_SHARE, 100)
            value = share[0] + (share[1] - share[0]) * done // max(total, 1)
            run.stage = stage
            if value > run.done:
                run.done = value
                progress(value, 100)

        params = params_from_settings(settings, algorithm=algorithm, since_us=since_us)
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

    async def status(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        active = await ml_models.active(self.database)
        latest = await ml_models.list_models(self.database, limit=1)
        return {
            "training": self.run.as_dict() if self.run is not None else None,
            "active": shown(active) if active is not None else None,
            "latest": shown(latest[0]) if latest else None,
        }

    async def models(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        rows: Sequence[ModelRow] = await ml_models.list_models(self.database)
        return {"items": [shown(row) for row in rows], "next_cursor": None}

    async def activate(self, args: ActivateArgs, _progress: Progress) -> dict[str, Any]:
        """Checks the model's file loads (its hash, its types) before it is activated: a
        refused file leaves the active model as it was."""
        from ml.registry import ModelRefused, load

        row = await ml_models.get(self.database, args.model_id)
        if row is None:
            raise invalid(f"no model {args.model_id}", "model_id")
        if row.status not in ("ready", "active") or row.file_path is None or row.sha256 is None:
            raise invalid(f"model {row.id} is {row.status}: only a ready model", "model_id")
        try:
            await asyncio.to_thread(load, row.file_path, row.sha256)
        except ModelRefused as exc:
            raise invalid(f"model {row.id} refused: {exc.reason}", "model_id") from None
        try:
            row = await ml_models.activate(self.database, row.id)
        except (UnknownModel, WrongStatus) as exc:
            raise invalid(str(exc), "model_id") from None
        log.info("model activated", model_id=row.id)
        return {"model": shown(row)}
