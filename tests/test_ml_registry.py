"""The model registry: rows on SQLite and PostgreSQL (statuses, one active, rollback),
and files (skops, the allow-list of types, the sha256)."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import io
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from rich.console import Console
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.cli.ml_views import models_view
from ml import registry, serving
from ml.serving import ModelRefused
from ml.train import TrainResult, train
from storage import ml_models
from storage.ml_models import DataWindow, ModelRow, UnknownModel, WrongStatus
from tests.support.ml import synthetic

WINDOW = DataWindow(
    since_us=1_000,
    until_us=9_000,
    holdout_from_us=7_000,
    train_rows=80,
    holdout_rows=20,
    train_positives=8,
    holdout_positives=2,
)


@pytest.fixture(scope="module")
def forest() -> TrainResult:
    return train(synthetic(1200, seed=5), "random_forest", seed=1, min_rows=100)


async def ready_model(engine: AsyncEngine, name: str) -> str:
    row = await ml_models.register(engine, algorithm="random_forest", seed=1)
    await ml_models.mark_ready(
        engine,
        row.id,
        window=WINDOW,
        metrics={"holdout": {"roc_auc": 0.8}},
        baseline_metrics={"feature": "concurrent_editors", "holdout": {"roc_auc": 0.7}},
        file_path=f"/models/{name}.skops",
        sha256="0" * 64,
        serving_sha256="1" * 64,
    )
    return row.id


async def statuses(engine: AsyncEngine) -> dict[str, str]:
    return {row.id: row.status for row in await ml_models.list_models(engine)}


async def test_activation_switches_the_active_model_and_rolls_back(engine: AsyncEngine) -> None:
    first = await ready_model(engine, "first")
    second = await ready_model(engine, "second")
    assert await ml_models.active(engine) is None

    assert (await ml_models.activate(engine, first)).status == "active"
    activated = await ml_models.activate(engine, second)
    assert activated.activated_at is not None
    assert await statuses(engine) == {first: "ready", second: "active"}

    # Rollback is activating the older model again.
    await ml_models.activate(engine, first)
    assert await statuses(engine) == {first: "active", second: "ready"}
    active = await ml_models.active(engine)
    assert active is not None and active.id == first
    # Again: nothing changes, and still exactly one is active.
    again = await ml_models.activate(engine, first)
    assert again.activated_at == active.activated_at
    assert list((await statuses(engine)).values()).count("active") == 1

    # Two activations at once: the later one wins, and only one model is active.
    third = await ready_model(engine, "third")
    await asyncio.gather(ml_models.activate(engine, second), ml_models.activate(engine, third))
    assert sorted((await statuses(engine)).values()) == ["active", "ready", "ready"]


async def test_rows_keep_what_training_found_and_are_listed_newest_first(
    engine: AsyncEngine,
) -> None:
    model_id = await ready_model(engine, "kept")
    row = await ml_models.get(engine, model_id)
    assert row is not None
    assert row.id.startswith("m_") and len(row.id) == 14
    assert row.status == "ready" and row.algorithm == "random_forest" and row.seed == 1
    assert row.window == WINDOW
    assert row.metrics == {"holdout": {"roc_auc": 0.8}}
    assert row.baseline_metrics == {"feature": "concurrent_editors", "holdout": {"roc_auc": 0.7}}
    assert row.file_path == "/models/kept.skops" and row.sha256 == "0" * 64
    assert row.finished_at is not None and row.finished_at >= row.created_at
    assert row.as_dict()["train_rows"] == 80
    assert await ml_models.get(engine, "m_000000000000") is None

    made = [model_id, *[await ready_model(engine, str(n)) for n in range(2)]]
    listed = [row.id for row in await ml_models.list_models(engine)]
    assert listed == made[::-1]  # newest first
    assert [row.id for row in await ml_models.list_models(engine, limit=2)] == made[:0:-1]


async def test_only_a_ready_model_is_activated(engine: AsyncEngine) -> None:
    training = await ml_models.register(engine, algorithm="logistic_regression", seed=2)
    with pytest.raises(WrongStatus, match="is training: only a ready model can be activated"):
        await ml_models.activate(engine, training.id)
    failed = await ml_models.mark_failed(engine, training.id, "one class only: ...")
    assert failed.status == "failed" and failed.failure_reason == "one class only: ..."
    assert failed.window is None
    with pytest.raises(WrongStatus, match="is failed"):
        await ml_models.activate(engine, training.id)
    with pytest.raises(WrongStatus, match="only a training run can be marked"):
        await ml_models.mark_failed(engine, training.id, "again")
    with pytest.raises(UnknownModel):
        await ml_models.activate(engine, "m_nothere")
    assert await ml_models.active(engine) is None


def test_a_saved_model_loads_when_its_bytes_are_the_registered_ones(
    tmp_path: Path, forest: TrainResult
) -> None:
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path / "models", "m_abc")
    assert saved.path == (tmp_path / "models" / "m_abc.skops").resolve()
    assert saved.sha256 == hashlib.sha256(saved.path.read_bytes()).hexdigest()
    loaded = registry.load(saved.path, saved.sha256)
    X = synthetic(50, seed=9).X
    assert np.array_equal(loaded.predict_proba(X), forest.pipeline.predict_proba(X))
    holdout = registry.load_holdout(saved.path)
    assert np.array_equal(holdout.y, forest.holdout.y)
    assert np.array_equal(holdout.model_scores, forest.holdout.model_scores)
    assert sorted(p.name for p in saved.path.parent.iterdir()) == [
        "m_abc.holdout.npz",
        "m_abc.serving.npz",
        "m_abc.skops",
    ]
    served = serving.load(saved.path, saved.sha256, saved.serving_sha256)
    assert (
        saved.serving_sha256
        == hashlib.sha256(serving.serving_path(saved.path).read_bytes()).hexdigest()
    )
    np.testing.assert_allclose(
        served(X), forest.pipeline.predict_proba(X)[:, 1], rtol=0, atol=serving.TOLERANCE
    )


def test_changed_bytes_are_refused(tmp_path: Path, forest: TrainResult) -> None:
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path, "m_abc")
    data = bytearray(saved.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    saved.path.write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match="has changed since it was registered"):
        registry.load(saved.path, saved.sha256)


def test_the_engine_refuses_a_changed_served_form_or_skops_file(
    tmp_path: Path, forest: TrainResult
) -> None:
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path, "m_abc")
    served = serving.serving_path(saved.path)
    original = served.read_bytes()
    served.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
    with pytest.raises(ModelRefused, match=r"m_abc\.serving\.npz has changed since"):
        serving.load(saved.path, saved.sha256, saved.serving_sha256)
    served.write_bytes(original)
    saved.path.write_bytes(saved.path.read_bytes() + b"\0")
    with pytest.raises(ModelRefused, match=r"m_abc\.skops has changed since"):
        serving.load(saved.path, saved.sha256, saved.serving_sha256)


def test_served_arrays_that_do_not_make_a_forest_are_refused(
    tmp_path: Path, forest: TrainResult
) -> None:
    """Registered honestly (its hash recorded) but wrong inside: a child past the
    last node. The walk indexes unchecked, so the load checks."""
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path, "m_abc")
    model = serving.load(saved.path, saved.sha256, saved.serving_sha256)
    assert isinstance(model, serving.Forest)
    children = model.children.copy()
    children[7] = len(model.value)
    sha = serving.write(replace(model, children=children), saved.path)
    with pytest.raises(ModelRefused, match="is not a served model: its arrays do not make"):
        serving.load(saved.path, saved.sha256, sha)


@pytest.mark.parametrize("registered", [False, True])
def test_a_model_without_its_served_form_is_read_through_its_skops_file(
    tmp_path: Path, forest: TrainResult, registered: bool
) -> None:
    """Registered before served forms existed (no `serving_sha256`), or restored
    from a backup that kept only the skops files: converted at load."""
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path, "m_abc")
    serving.serving_path(saved.path).unlink()
    served = serving.load(saved.path, saved.sha256, saved.serving_sha256 if registered else None)
    X = synthetic(50, seed=9).X
    np.testing.assert_allclose(
        served(X), forest.pipeline.predict_proba(X)[:, 1], rtol=0, atol=serving.TOLERANCE
    )
    saved.path.write_bytes(saved.path.read_bytes() + b"\0")
    with pytest.raises(ModelRefused, match=r"m_abc\.skops has changed since"):
        serving.load(saved.path, saved.sha256, saved.serving_sha256 if registered else None)
    sha = write_skops(
        tmp_path / "m_evil.skops", Pipeline([("run", FunctionTransformer(func=builtins.eval))])
    )
    with pytest.raises(ModelRefused, match="types not allowed in a model"):
        serving.load(tmp_path / "m_evil.skops", sha, None)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelRefused, match="cannot read"):
        registry.load(tmp_path / "m_gone.skops", "0" * 64)


def write_skops(path: Path, obj: object) -> str:
    """A skops file whose registered hash is honest: only its content is wrong."""
    data = sio.dumps(obj, compression=zipfile.ZIP_DEFLATED)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_a_file_holding_an_unexpected_type_is_refused(tmp_path: Path) -> None:
    # A Pipeline that would call eval() on what it scores: skops stores the function
    # by name, and loading it would need builtins.eval trusted.
    evil = Pipeline([("run", FunctionTransformer(func=builtins.eval))])
    path = tmp_path / "m_evil.skops"
    sha = write_skops(path, evil)
    with pytest.raises(ModelRefused, match=r"types not allowed in a model: builtins\.eval"):
        registry.load(path, sha)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"weights": [1, 2]}, "is not a conflict model: it holds dict"),
        (Pipeline([("scale", FunctionTransformer())]), "is not a conflict model"),
    ],
)
def test_a_file_that_is_not_a_conflict_model_is_refused(
    tmp_path: Path, content: object, reason: str
) -> None:
    path = tmp_path / "m_other.skops"
    sha = write_skops(path, content)
    with pytest.raises(ModelRefused, match=reason):
        registry.load(path, sha)


def test_bytes_that_are_not_skops_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m_junk.skops"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ModelRefused, match="not a readable skops file"):
        registry.load(path, hashlib.sha256(b"not a zip file").hexdigest())


def test_the_models_table_fits_a_terminal_and_says_why_a_run_failed() -> None:
    ready = ModelRow(
        id="m_0123456789ab",
        algorithm="random_forest",
        status="active",
        seed=0,
        created_at=1_796_536_600_000_000,
        window=WINDOW,
        metrics={"holdout": {"roc_auc": 0.8281, "pr_auc": 0.9641}},
        baseline_metrics={"feature": "concurrent_editors", "holdout": {"roc_auc": 0.55}},
        failure_reason=None,
        file_path="/models/m_0123456789ab.skops",
        sha256="0" * 64,
        serving_sha256="1" * 64,
        finished_at=None,
        activated_at=None,
    )
    failed = replace(
        ready,
        id="m_ba9876543210",
        algorithm="logistic_regression",
        status="failed",
        window=None,
        metrics=None,
        baseline_metrics=None,
        failure_reason="one class only: no conflict member in all 1200 operations",
    )
    shown = io.StringIO()
    console = Console(width=80, file=shown, color_system=None)
    console.print(*models_view([ml_models.shown(failed), ml_models.shown(ready)], console.width))
    lines = shown.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == [
        "id",
        "algorithm",
        "status",
        "rows",
        "ROC",
        "AUC",
        "PR",
        "AUC",
        "baseline",
        "created",
    ]
    assert lines[2].split()[:4] == ["m_ba9876543210", "logistic", "failed", "-"]
    assert lines[3].split()[:7] == [
        "m_0123456789ab",
        "forest",
        "active",
        "100",
        "0.828",
        "0.964",
        "0.550",
    ]
    assert lines[4] == (
        "m_ba9876543210 failed: one class only: no conflict member in all 1200 operations"
    )
