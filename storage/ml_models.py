"""The model registry's rows: what was trained, on what, how well, and which one serves.

A row exists from the moment a training starts, so that `ml/status` can show a run
in progress, and a run that dies leaves a row that says so once marked. Only a
`ready` model can become `active`; activating one makes the previous active model
`ready` again in the same transaction, which is also how an operator rolls back.
The files themselves are ml/registry.py's; this module never reads them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import msgspec
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from handlers.records import OutboxRecord
from handlers.times import now_us, rfc3339
from storage import outbox
from storage.schema import ml_models

Status = Literal["training", "ready", "failed", "active"]

TRAINING: Status = "training"
READY: Status = "ready"
FAILED: Status = "failed"
ACTIVE: Status = "active"

_ACTIVATE_ATTEMPTS = 3
"""Two activations at once: the later one meets the partial unique index, and its
retry sees the first one's commit and demotes it (the last activation wins)."""

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class UnknownModel(LookupError):
    def __init__(self, model_id: str) -> None:
        super().__init__(f"no model {model_id!r}")
        self.model_id = model_id


class WrongStatus(Exception):
    """The model exists but its status forbids the change: activating one that is
    training or failed, or marking a run that has already ended."""

    def __init__(self, model_id: str, status: str, wanted: str) -> None:
        super().__init__(f"model {model_id} is {status}: {wanted}")
        self.model_id = model_id
        self.status = status


@dataclass(frozen=True)
class DataWindow:
    """What a model learned from and was judged on, known once the data is split."""

    since_us: int
    until_us: int
    holdout_from_us: int
    train_rows: int
    holdout_rows: int
    train_positives: int
    holdout_positives: int


@dataclass(frozen=True)
class ModelRow:
    id: str
    algorithm: str
    status: Status
    seed: int
    created_at: int
    window: DataWindow | None
    metrics: dict[str, Any] | None
    baseline_metrics: dict[str, Any] | None
    failure_reason: str | None
    file_path: str | None
    sha256: str | None
    serving_sha256: str | None
    """Of the model's served form (ml/serving.py); None for a model older than it."""
    finished_at: int | None
    activated_at: int | None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values, for `--json-output` and the admin answers."""
        window = self.window
        return {
            "id": self.id,
            "algorithm": self.algorithm,
            "status": self.status,
            "seed": self.seed,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "activated_at": self.activated_at,
            "data_since": window.since_us if window else None,
            "data_until": window.until_us if window else None,
            "holdout_from": window.holdout_from_us if window else None,
            "train_rows": window.train_rows if window else None,
            "holdout_rows": window.holdout_rows if window else None,
            "train_positives": window.train_positives if window else None,
            "holdout_positives": window.holdout_positives if window else None,
            "metrics": self.metrics,
            "baseline_metrics": self.baseline_metrics,
            "failure_reason": self.failure_reason,
            "file_path": self.file_path,
            "sha256": self.sha256,
        }


def shown(row: ModelRow) -> dict[str, Any]:
    """A model as answers, events and views show it: times in RFC 3339, the holdout's
    figures beside the baseline's, and the verdict (a higher holdout ROC AUC)."""
    window = row.window
    metrics = (row.metrics or {}).get("holdout")
    baseline = row.baseline_metrics or {}
    held_base = baseline.get("holdout")
    return {
        "model_id": row.id,
        "algorithm": row.algorithm,
        "status": row.status,
        "created_at": rfc3339(row.created_at),
        "finished_at": rfc3339(row.finished_at),
        "activated_at": rfc3339(row.activated_at),
        "data_since": rfc3339(window.since_us) if window else None,
        "data_until": rfc3339(window.until_us) if window else None,
        "train_rows": window.train_rows if window else None,
        "holdout_rows": window.holdout_rows if window else None,
        "holdout_positives": window.holdout_positives if window else None,
        "metrics": metrics,
        "baseline": {"feature": baseline.get("feature"), **held_base} if held_base else None,
        "beats_baseline": (
            bool(metrics["roc_auc"] > held_base["roc_auc"]) if metrics and held_base else None
        ),
        "failure_reason": row.failure_reason,
    }


Announce = Callable[[ModelRow], Sequence[OutboxRecord]]
"""The outbox rows that tell of a model that became ready."""


def new_id() -> str:
    return f"m_{secrets.token_hex(6)}"


def _window_values(window: DataWindow | None) -> dict[str, Any]:
    if window is None:
        return {}
    return {
        "data_since": window.since_us,
        "data_until": window.until_us,
        "holdout_from": window.holdout_from_us,
        "train_rows": window.train_rows,
        "holdout_rows": window.holdout_rows,
        "train_positives": window.train_positives,
        "holdout_positives": window.holdout_positives,
    }


def _row(values: Any) -> ModelRow:
    window = None
    if values["train_rows"] is not None:
        window = DataWindow(
            since_us=values["data_since"],
            until_us=values["data_until"],
            holdout_from_us=values["holdout_from"],
            train_rows=values["train_rows"],
            holdout_rows=values["holdout_rows"],
            train_positives=values["train_positives"],
            holdout_positives=values["holdout_positives"],
        )
    return ModelRow(
        id=values["id"],
        algorithm=values["algorithm"],
        status=values["status"],
        seed=values["seed"],
        created_at=values["created_at"],
        window=window,
        metrics=_decode(values["metrics"]) if values["metrics"] else None,
        baseline_metrics=_decode(values["baseline_metrics"])
        if values["baseline_metrics"]
        else None,
        failure_reason=values["failure_reason"],
        file_path=values["file_path"],
        sha256=values["sha256"],
        serving_sha256=values["serving_sha256"],
        finished_at=values["finished_at"],
        activated_at=values["activated_at"],
    )


async def _fetch(conn: AsyncConnection, model_id: str) -> ModelRow:
    found = (
        (await conn.execute(select(ml_models).where(ml_models.c.id == model_id)))
        .mappings()
        .one_or_none()
    )
    if found is None:
        raise UnknownModel(model_id)
    return _row(found)


async def register(engine: AsyncEngine, *, algorithm: str, seed: int) -> ModelRow:
    """A new row, `training`: the run is visible before it has any data."""
    model_id = new_id()
    async with engine.begin() as conn:
        await conn.execute(
            ml_models.insert().values(
                id=model_id, algorithm=algorithm, status=TRAINING, seed=seed, created_at=now_us()
            )
        )
        return await _fetch(conn, model_id)


async def mark_ready(
    engine: AsyncEngine,
    model_id: str,
    *,
    window: DataWindow,
    metrics: dict[str, Any],
    baseline_metrics: dict[str, Any],
    file_path: str,
    sha256: str,
    serving_sha256: str,
    announce: Announce | None = None,
) -> ModelRow:
    """`announce(row)`: the outbox rows that tell of the ready model (`model.trained`),
    written in the same transaction, so that a model is never ready unannounced."""
    return await _finish(
        engine,
        model_id,
        {
            "status": READY,
            **_window_values(window),
            "metrics": _encode(metrics).decode(),
            "baseline_metrics": _encode(baseline_metrics).decode(),
            "file_path": file_path,
            "sha256": sha256,
            "serving_sha256": serving_sha256,
        },
        announce,
    )


async def mark_failed(
    engine: AsyncEngine, model_id: str, reason: str, *, window: DataWindow | None = None
) -> ModelRow:
    """`window`: the data's extent when the failure came after the split (it tells
    the operator how much there was)."""
    return await _finish(
        engine, model_id, {"status": FAILED, "failure_reason": reason, **_window_values(window)}
    )


async def _finish(
    engine: AsyncEngine, model_id: str, values: dict[str, Any], announce: Announce | None = None
) -> ModelRow:
    """Only a `training` row ends: marking a model twice would rewrite its history."""
    async with engine.begin() as conn:
        current = await _fetch(conn, model_id)
        if current.status != TRAINING:
            raise WrongStatus(model_id, current.status, "only a training run can be marked")
        now = now_us()
        await conn.execute(
            update(ml_models).where(ml_models.c.id == model_id).values(finished_at=now, **values)
        )
        row = await _fetch(conn, model_id)
        if announce is not None:
            await outbox.add(conn, announce(row), now)
        return row


async def activate(engine: AsyncEngine, model_id: str) -> ModelRow:
    """Make `model_id` the one active model; the active one before becomes `ready`.

    Activating the active model again changes nothing. Raises UnknownModel or
    WrongStatus.
    """
    attempt = 1
    while True:
        try:
            return await _activate_once(engine, model_id)
        except IntegrityError:
            if attempt == _ACTIVATE_ATTEMPTS:
                raise
            attempt += 1


async def _activate_once(engine: AsyncEngine, model_id: str) -> ModelRow:
    async with engine.begin() as conn:
        current = await _fetch(conn, model_id)
        if current.status == ACTIVE:
            return current
        if current.status != READY:
            raise WrongStatus(model_id, current.status, "only a ready model can be activated")
        await conn.execute(
            update(ml_models).where(ml_models.c.status == ACTIVE).values(status=READY)
        )
        await conn.execute(
            update(ml_models)
            .where(ml_models.c.id == model_id)
            .values(status=ACTIVE, activated_at=now_us())
        )
        return await _fetch(conn, model_id)


async def list_models(engine: AsyncEngine, limit: int | None = None) -> list[ModelRow]:
    """Newest first."""
    query = select(ml_models).order_by(ml_models.c.created_at.desc(), ml_models.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        return [_row(row) for row in (await conn.execute(query)).mappings()]


async def get(engine: AsyncEngine, model_id: str) -> ModelRow | None:
    async with engine.connect() as conn:
        try:
            return await _fetch(conn, model_id)
        except UnknownModel:
            return None


async def active(engine: AsyncEngine) -> ModelRow | None:
    async with engine.connect() as conn:
        found = (
            (await conn.execute(select(ml_models).where(ml_models.c.status == ACTIVE)))
            .mappings()
            .one_or_none()
        )
    return _row(found) if found is not None else None


class ActiveFile(NamedTuple):
    model_id: str
    file_path: str
    sha256: str
    serving_sha256: str | None


async def active_file(conn: AsyncConnection) -> ActiveFile | None:
    """The active model's files, in the caller's transaction: what the online scorer
    checks, every few seconds, to follow activations."""
    m = ml_models.c
    found = (
        await conn.execute(
            select(m.id, m.file_path, m.sha256, m.serving_sha256).where(
                m.status == ACTIVE, m.file_path.is_not(None), m.sha256.is_not(None)
            )
        )
    ).one_or_none()
    return None if found is None else ActiveFile(found[0], found[1], found[2], found[3])
