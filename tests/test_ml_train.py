"""Training: a registered model with every metric, honest splits, the baseline, typed
failures that end as `failed` rows, cancellation, the worker process, the report."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from gateway.cli.main import app
from loadgen.generator import GeneratorOptions
from ml import registry
from ml.dataset import FEATURES, Dataset
from ml.pipeline import TrainParams, train_registered
from ml.report import PICTURES, write_report
from ml.train import METRICS, TrainingFailed, TrainResult, train
from storage import ml_models
from storage.ml_models import ModelRow
from tests.support.ml import COMMIT_US, relabelled, synthetic
from tests.support.ml_data import store_causal

ROWS = 4000


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return synthetic(ROWS, seed=7)


@pytest.fixture(scope="module")
def forest(dataset: Dataset) -> TrainResult:
    return train(dataset, "random_forest", seed=3, min_rows=500)


def params(tmp_path: Path, algorithm: Any = "random_forest", **more: Any) -> TrainParams:
    return TrainParams(
        algorithm=algorithm, models_dir=tmp_path / "models", min_rows=500, seed=3, **more
    )


async def run(
    engine: AsyncEngine, data: Dataset, how: TrainParams, *, in_process: bool = False
) -> ModelRow:
    row = await ml_models.register(engine, algorithm=how.algorithm, seed=how.seed)
    return await train_registered(engine, row, data, how, in_process=in_process)


def assert_metrics(found: dict[str, Any], rows: int) -> None:
    assert set(found) == set(METRICS)
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
        assert 0.0 <= found[name] <= 1.0, name
    (tn, fp), (fn, tp) = found["confusion_matrix"]
    assert min(tn, fp, fn, tp) >= 0 and tn + fp + fn + tp == rows


async def test_training_registers_a_model_with_every_metric(
    engine: AsyncEngine, dataset: Dataset, tmp_path: Path
) -> None:
    row = await run(engine, dataset, params(tmp_path, "logistic_regression"))
    assert row.status == "ready" and row.failure_reason is None
    assert row.metrics is not None and row.baseline_metrics is not None
    assert row.window is not None

    window = row.window
    assert window.train_rows + window.holdout_rows == ROWS
    assert window.holdout_rows == ROWS // 5  # whole commits of 4: the cut falls between two
    assert window.train_positives + window.holdout_positives == int(dataset.y.sum())
    assert window.since_us == dataset.stored_at[0] and window.until_us == dataset.stored_at[-1]
    assert window.holdout_from_us == dataset.stored_at[window.train_rows]

    assert set(row.metrics) == {"holdout", "stratified", "importances"}
    assert_metrics(row.metrics["holdout"], window.holdout_rows)
    assert_metrics(row.metrics["stratified"], ROWS // 5)
    assert list(row.metrics["importances"]) == list(FEATURES)
    assert sum(row.metrics["importances"].values()) == pytest.approx(1.0)
    assert set(row.baseline_metrics) == {"feature", "holdout", "stratified"}
    assert row.baseline_metrics["feature"] in FEATURES
    assert_metrics(row.baseline_metrics["holdout"], window.holdout_rows)
    assert_metrics(row.baseline_metrics["stratified"], ROWS // 5)

    assert row.file_path is not None and row.sha256 is not None
    model = registry.load(row.file_path, row.sha256)
    assert [name for name, _ in model.steps] == ["scale", "logistic"]
    assert model[-1].class_weight == "balanced"
    holdout = registry.load_holdout(row.file_path)
    assert np.allclose(
        model.predict_proba(dataset.X[window.train_rows :])[:, 1], holdout.model_scores
    )
    assert np.array_equal(holdout.y, dataset.y[window.train_rows :])


def test_the_forest_beats_the_best_single_feature_where_two_act_together(
    forest: TrainResult,
) -> None:
    baseline, metrics = forest.baseline, forest.metrics
    assert baseline["feature"] in ("concurrent_editors", "hours_since_last_sync")
    assert metrics["holdout"]["roc_auc"] >= baseline["holdout"]["roc_auc"] + 0.05
    assert metrics["holdout"]["pr_auc"] > baseline["holdout"]["pr_auc"]
    assert forest.beats_baseline
    importances = metrics["importances"]
    assert sum(importances.values()) == pytest.approx(1.0)
    # The two causes carry the model; the two features without signal do not.
    assert min(importances["concurrent_editors"], importances["hours_since_last_sync"]) > max(
        importances["entity_edit_frequency"], importances["field_overlap_score"]
    )


def test_the_holdout_is_the_latest_fifth_and_keeps_a_commit_whole() -> None:
    # Commits of 3: 80% of 1000 rows falls inside a commit, which goes whole to the holdout.
    base = synthetic(1000, seed=2)
    stored_at = (1_000_000 + (np.arange(1000) // 3) * COMMIT_US).astype(np.int64)
    data = Dataset(X=base.X, y=base.y, stored_at=stored_at, op_ids=base.op_ids)
    result = train(data, "logistic_regression", seed=1, min_rows=100)
    assert result.window.train_rows == 798 and result.window.holdout_rows == 202
    assert result.window.holdout_from_us == stored_at[798] == stored_at[800]
    assert len(result.holdout.y) == 202


async def test_one_class_only_ends_failed_with_its_reason(
    engine: AsyncEngine, dataset: Dataset, tmp_path: Path
) -> None:
    none = relabelled(dataset, np.zeros(ROWS))
    row = await run(engine, none, params(tmp_path, "logistic_regression"))
    assert row.status == "failed"
    assert row.failure_reason == f"one class only: no conflict member in all {ROWS} operations"
    assert row.file_path is None and row.metrics is None
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        (
            lambda n: np.arange(n) >= n - 10,  # members only among the latest
            "one class only: no conflict member in the training part (the first 3200",
        ),
        (
            lambda n: np.arange(n) < 10,  # members only among the earliest
            "one class only: no conflict member in the holdout (the latest 800",
        ),
        (np.ones, "one class only: every operation is a conflict member in all"),
    ],
)
def test_one_class_in_either_part_is_a_typed_failure(
    dataset: Dataset, labels: Any, reason: str
) -> None:
    with pytest.raises(TrainingFailed) as failed:
        train(relabelled(dataset, labels(ROWS)), "random_forest", seed=1, min_rows=500)
    assert failed.value.reason.startswith(reason)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_too_few_rows_end_failed_with_its_reason(engine: AsyncEngine, tmp_path: Path) -> None:
    row = await run(engine, synthetic(120, seed=1), params(tmp_path))
    assert row.status == "failed"
    assert row.failure_reason == (
        "too few rows: 120 operations with a closed window, 500 needed (ml.min_rows)"
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_cancelled_run_stops_and_ends_failed(
    engine: AsyncEngine, dataset: Dataset, tmp_path: Path
) -> None:
    row = await ml_models.register(engine, algorithm="random_forest", seed=3)
    stages: list[tuple[str, int, int]] = []
    seen = asyncio.Event()

    def step(*values: Any) -> None:
        stages.append(values)
        seen.set()

    training = asyncio.ensure_future(train_registered(engine, row, dataset, params(tmp_path), step))
    await asyncio.wait_for(seen.wait(), 30)
    training.cancel()
    with pytest.raises(asyncio.CancelledError):
        await training
    stopped = len(stages)
    await asyncio.sleep(0.3)
    assert len(stages) == stopped < stages[0][2]  # nothing trains on after the cancel
    failed = await ml_models.get(engine, row.id)
    assert failed is not None and failed.status == "failed" and failed.failure_reason == "cancelled"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_worker_process_reports_progress_in_order_registers_and_can_be_cancelled(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    small, how = synthetic(1200, seed=4), params(tmp_path)
    stages: list[tuple[str, int, int]] = []
    row = await ml_models.register(engine, algorithm="random_forest", seed=3)
    result = await train_registered(
        engine, row, small, how, lambda *step: stages.append(step), in_process=True
    )
    assert result.status == "ready"
    total = stages[0][2]
    assert [done for _, done, _ in stages] == list(range(1, total + 1))
    assert {t for _, _, t in stages} == {total}
    names = [stage for stage, _, _ in stages]
    assert names[0] == "baseline" and names[-1] == "metrics"
    assert names.index("stratified model") > names.index("model")

    row = await ml_models.register(engine, algorithm="random_forest", seed=3)
    seen = asyncio.Event()
    training = asyncio.ensure_future(
        train_registered(engine, row, small, how, lambda *_: seen.set(), in_process=True)
    )
    await asyncio.wait_for(seen.wait(), 60)
    training.cancel()
    with pytest.raises(asyncio.CancelledError):
        await training
    failed = await ml_models.get(engine, row.id)
    assert failed is not None and failed.status == "failed" and failed.failure_reason == "cancelled"
    assert not (tmp_path / "models" / f"{row.id}.skops").exists()


def test_the_report_writes_its_pictures_and_a_page(forest: TrainResult, tmp_path: Path) -> None:
    saved = registry.save(forest.pipeline, forest.holdout, tmp_path / "models", "m_0123456789ab")
    row = ModelRow(
        id="m_0123456789ab",
        algorithm=forest.algorithm,
        status="ready",
        seed=forest.seed,
        created_at=int(forest.window.until_us),
        window=forest.window,
        metrics=forest.metrics,
        baseline_metrics=forest.baseline,
        failure_reason=None,
        file_path=str(saved.path),
        sha256=saved.sha256,
        serving_sha256=saved.serving_sha256,
        finished_at=None,
        activated_at=None,
    )
    out = tmp_path / "report"
    written = write_report(row, registry.load_holdout(saved.path), out)
    names = [name for name, _ in PICTURES]
    assert sorted(p.name for p in written) == sorted([*names, "report.md"])
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    page = (out / "report.md").read_text()
    assert page.startswith(f"# Conflict model {row.id}\n")
    assert "**Verdict: the model beats the baseline**" in page
    assert re.search(r"\| metric \| model \| baseline \(`\w+`\) \|\n\|---\|---:\|---:\|", page)
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"):
        assert re.search(rf"^\| {name} \| 0\.\d{{3}} \| 0\.\d{{3}} \|$", page, re.M), name
    for name in names:
        assert f"]({name})" in page


def test_fieldgate_ml_trains_lists_and_reports_on_a_simulated_log(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    options = GeneratorOptions(devices=8, entities=60, seed=2, max_ops=2000, payloads_per_s=0.05)
    assert asyncio.run(store_causal(url, options, ops_per_commit=50)) == 2000
    runner = CliRunner()
    (tmp_path / "empty.toml").write_text("")
    env = {
        "FIELDGATE_DATABASE__URL": url,
        "FIELDGATE_ML__MODELS_DIR": str(tmp_path / "models"),
        "FIELDGATE_ML__MIN_ROWS": "100",
        "FIELDGATE_CONFIG": str(tmp_path / "empty.toml"),
    }

    trained = runner.invoke(app, ["ml", "train", "--algorithm", "logistic_regression"], env=env)
    assert trained.exit_code == 0, trained.output
    assert "time-ordered holdout" in trained.output and "verdict: the model" in trained.output

    listed = runner.invoke(app, ["ml", "models", "--json-output"], env=env)
    assert listed.exit_code == 0, listed.output
    (model,) = json.loads(listed.output)
    assert model["status"] == "ready" and model["algorithm"] == "logistic_regression"
    assert model["train_rows"] + model["holdout_rows"] <= 2000
    assert model["id"] in trained.output
    assert set(model["metrics"]["holdout"]) == set(METRICS)
    assert Path(model["file_path"]).parent == (tmp_path / "models").resolve()

    out = tmp_path / "report"
    reported = runner.invoke(app, ["ml", "report", model["id"], "--out", str(out)], env=env)
    assert reported.exit_code == 0, reported.output
    assert (out / "report.md").read_text().startswith(f"# Conflict model {model['id']}")

    later = runner.invoke(app, ["ml", "train", "--since", "2999-01-01T00:00:00Z"], env=env)
    assert later.exit_code == 1
    assert "too few rows: 0 operations" in later.output
    missing = runner.invoke(app, ["ml", "report", "m_000000000000", "--out", str(out)], env=env)
    assert missing.exit_code == 1
