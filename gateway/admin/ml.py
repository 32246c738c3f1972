"""`ml/train`, `ml/status`, `ml/models`, `ml/activate`: conflict prediction's registry.

Training is a long command: it answers `accepted`, reports progress, and answers
with the model. The runs themselves (one at a time, in a worker process) and the
checks before an activation are the trainer's (gateway/outbound/training.py),
which the schedule shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.admin.args import CommandError, NoArgs, invalid, us
from gateway.admin.server import Command
from gateway.outbound.training import Busy, Refused, Trainer
from handlers.admin import Progress
from handlers.errors import Code
from handlers.fields import AwareTime, Str64
from storage import ml_models
from storage.ml_models import ModelRow, shown


class TrainArgs(msgspec.Struct, forbid_unknown_fields=True):
    algorithm: Literal["random_forest", "logistic_regression"] | None = None
    since: AwareTime | None = None


class ActivateArgs(msgspec.Struct, forbid_unknown_fields=True):
    model_id: Str64


class MlCommands:
    def __init__(self, database: AsyncEngine, trainer: Trainer) -> None:
        self.database = database
        self.trainer = trainer

    def commands(self) -> list[Command]:
        return [
            Command("ml/train", self.train, TrainArgs, long=True, writes=True),
            Command("ml/status", self.status),
            Command("ml/models", self.models),
            Command("ml/activate", self.activate, ActivateArgs, writes=True),
        ]

    async def train(self, args: TrainArgs, progress: Progress) -> dict[str, Any]:
        try:
            row = await self.trainer.train(args.algorithm, us(args.since), progress)
        except Busy:
            raise CommandError(
                Code.UNAVAILABLE, "a training run is under way (ml/status): ask again after it"
            ) from None
        return {"model": shown(row)}

    async def status(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        active = await ml_models.active(self.database)
        latest = await ml_models.list_models(self.database, limit=1)
        run = self.trainer.run
        return {
            "training": run.as_dict() if run is not None else None,
            "active": shown(active) if active is not None else None,
            "latest": shown(latest[0]) if latest else None,
        }

    async def models(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        rows: Sequence[ModelRow] = await ml_models.list_models(self.database)
        return {"items": [shown(row) for row in rows], "next_cursor": None}

    async def activate(self, args: ActivateArgs, _progress: Progress) -> dict[str, Any]:
        try:
            row = await self.trainer.activate(args.model_id)
        except Refused as exc:
            raise invalid(exc.reason, "model_id") from None
        return {"model": shown(row)}
