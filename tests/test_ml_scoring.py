"""The served model (ml/serving.py): a forest walked over arrays gives exactly
scikit-learn's `predict_proba` (up to its threads' order of summing), a logistic
regression the same to 1e-12, and loading one never imports scikit-learn."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from ml import registry, serving
from ml.dataset import FEATURES
from ml.scoring import NEUTRAL, REASONS, reasons
from ml.train import Holdout
from tests.support.ml import synthetic


def data(rows: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, (rows, 5)) * [6, 168, 1, 40, 1]
    y = ((X[:, 0] > 2) | (X[:, 1] > 100)).astype(int)
    return X, y


def fresh(rows: int) -> np.ndarray:
    """Past the training data's ranges, and on its thresholds' float32 edges: whole
    counts, and values a float32 rounding away from others."""
    X = data(rows)[0] * 1.7
    X[:, 0] = np.floor(X[:, 0])
    X[::3, 1] = np.float32(X[::3, 1])
    return X


@pytest.mark.parametrize("depth", [8, 16])
def test_a_forest_walked_over_arrays_gives_predict_probas_numbers_exactly(depth: int) -> None:
    """Depth 16 on noisy labels: trees deeper than COMPACT_DEPTH, walked with the
    leaves dropped at COMPACT_AT (a model trained before ml.train's trees were made
    shallower)."""
    X, y = data()
    if depth > serving.COMPACT_DEPTH:
        y = np.random.default_rng(5).integers(0, 2, len(y))
    forest = RandomForestClassifier(n_estimators=25, max_depth=depth, random_state=0, n_jobs=1)
    model = Pipeline([("forest", forest.fit(X, y))])
    served = serving.export(model)
    assert isinstance(served, serving.Forest)
    assert (served.depth > serving.COMPACT_DEPTH) == (depth > serving.COMPACT_DEPTH)
    for rows in (1, 22, serving.CHUNK, 1000):
        X = fresh(rows)
        np.testing.assert_array_equal(served(X), model.predict_proba(X)[:, 1])


def test_a_forest_with_threads_differs_from_it_by_at_most_the_order_of_summing() -> None:
    X, y = data()
    forest = RandomForestClassifier(n_estimators=40, random_state=0, n_jobs=2).fit(X, y)
    model = Pipeline([("forest", forest)])
    X = fresh(2000)
    np.testing.assert_allclose(
        serving.export(model)(X), model.predict_proba(X)[:, 1], rtol=0, atol=1e-15
    )


def test_a_logistic_regression_gives_predict_probas_numbers() -> None:
    X, y = data()
    model = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())]).fit(X, y)
    served = serving.export(model)
    assert isinstance(served, serving.Logistic)
    X = fresh(500)
    np.testing.assert_allclose(served(X), model.predict_proba(X)[:, 1], rtol=0, atol=1e-12)


def test_a_pipeline_of_another_shape_has_no_served_form() -> None:
    X, y = data()
    model = Pipeline([("same", FunctionTransformer()), ("logistic", LogisticRegression())])
    with pytest.raises(ValueError, match=r"no served form for \['FunctionTransformer'"):
        serving.export(model.fit(X, y))


def test_the_engine_loads_a_served_model_without_importing_scikit_learn(
    tmp_path: Path,
) -> None:
    """What the engine does at a start with a model active, in a fresh interpreter:
    scikit-learn (~1 s to import, ~150 MiB) and skops stay out."""
    trained = synthetic(800, seed=5)
    forest = RandomForestClassifier(n_estimators=10, random_state=0, n_jobs=1)
    model = Pipeline([("forest", forest.fit(trained.X, trained.y))])
    saved = registry.save(model, _holdout(), tmp_path, "m_abc")
    X = trained.X[:40]
    np.save(tmp_path / "X.npy", X)
    script = f"""
import sys
import numpy as np
from ml import scoring, serving
model = serving.load({str(saved.path)!r}, {saved.sha256!r}, {saved.serving_sha256!r})
np.save({str(tmp_path / "risk.npy")!r}, model(np.load({str(tmp_path / "X.npy")!r})))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("sklearn", "skops", "scipy", "pandas")))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"
    np.testing.assert_array_equal(np.load(tmp_path / "risk.npy"), model.predict_proba(X)[:, 1])


def _holdout() -> Holdout:
    return Holdout(
        y=np.array([0, 1], dtype=np.int8),
        model_scores=np.array([0.1, 0.9]),
        baseline_scores=np.array([0.2, 0.8]),
    )


def test_reasons_are_the_features_whose_neutral_value_lowers_the_risk_most() -> None:
    """Labels made of the first two features: a row high in both names those two; a
    row neutral in all but the first names it, then the first of the others (all
    drop 0: the features' order breaks the tie). Each row's reasons are the largest
    drops computed one probe at a time."""
    X, y = data()
    model = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())])
    predict = serving.export(model.fit(X, y))
    rows = np.array([[5.0, 160.0, 0.5, 3.0, 0.2], [5.0, 0.0, 0.5, 0.0, 0.0]])
    risks = predict(rows)
    got = reasons(predict, rows, risks)
    drops = []
    for row, risk in zip(rows, risks, strict=True):
        probes = np.repeat(row[None, :], 5, axis=0)
        probes[np.arange(5), np.arange(5)] = NEUTRAL
        drops.append(risk - predict(probes))
    for row_reasons, drop in zip(got, drops, strict=True):
        order = np.argsort(-drop, kind="stable")[:2]
        assert row_reasons == tuple(
            ("concurrent_editors", "hours_since_last_sync", "user_conflict_rate",
             "entity_edit_frequency", "field_overlap_score")[j] for j in order
        )  # fmt: skip
    assert set(got[0]) == {"concurrent_editors", "hours_since_last_sync"}
    assert got[1] == ("concurrent_editors", "hours_since_last_sync")


@pytest.mark.parametrize("algorithm", ["forest", "logistic"])
def test_reasons_skip_only_probes_that_cannot_change_the_score(algorithm: str) -> None:
    """Against every feature probed through scikit-learn, one at a time: the same
    reasons, though a forest skips the probes with no threshold between the value
    and its neutral one (here, hours a hair above 0 and rates a hair off 0.5)."""
    X, y = data()
    estimator = (
        Pipeline([("forest", RandomForestClassifier(n_estimators=30, random_state=1).fit(X, y))])
        if algorithm == "forest"
        else Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())]).fit(X, y)
    )
    model = serving.export(estimator)
    rows = fresh(300)
    rows[::2, 1] = 1e-6
    rows[1::4, 2] = 0.5 + 1e-9
    risks = model(rows)
    skipped = sum(
        int(
            np.count_nonzero((rows[:, j] != NEUTRAL[j]) & ~model.changes(j, rows[:, j], NEUTRAL[j]))
        )
        for j in range(len(FEATURES))
    )
    drops = np.zeros(rows.shape)
    for j, neutral in enumerate(NEUTRAL):
        probes = rows.copy()
        probes[:, j] = neutral
        changed = rows[:, j] != neutral
        drops[:, j] = np.where(changed, risks - estimator.predict_proba(probes)[:, 1], 0)
    order = np.argsort(-drops, axis=1, kind="stable")[:, :REASONS]
    assert reasons(model, rows, risks) == [tuple(FEATURES[j] for j in row) for row in order]
    assert (skipped > 100) == (algorithm == "forest")
