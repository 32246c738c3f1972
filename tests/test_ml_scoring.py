"""The scorer's predictor: a forest summed tree by tree gives exactly scikit-learn's
`predict_proba`, and anything else is left to `predict_proba`."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ml.scoring import NEUTRAL, Predictor, reasons


def data(rows: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, (rows, 5)) * [6, 168, 1, 40, 1]
    y = ((X[:, 0] > 2) | (X[:, 1] > 100)).astype(int)
    return X, y


def test_a_forest_is_summed_tree_by_tree_with_predict_probas_numbers() -> None:
    X, y = data()
    forest = RandomForestClassifier(n_estimators=25, max_depth=8, random_state=0)
    model = Pipeline([("forest", forest.fit(X, y))])
    predictor = Predictor(model)
    assert predictor._trees is not None
    fresh = data(333)[0] * 1.7
    np.testing.assert_array_equal(predictor(fresh), model.predict_proba(fresh)[:, 1])


def test_a_logistic_regression_is_left_to_predict_proba() -> None:
    X, y = data()
    model = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())]).fit(X, y)
    predictor = Predictor(model)
    assert predictor._trees is None
    np.testing.assert_array_equal(predictor(X), model.predict_proba(X)[:, 1])


def test_reasons_are_the_features_whose_neutral_value_lowers_the_risk_most() -> None:
    """Labels made of the first two features: a row high in both names those two; a
    row neutral in all but the first names it, then the first of the others (all
    drop 0: the features' order breaks the tie). Each row's reasons are the largest
    drops computed one probe at a time."""
    X, y = data()
    model = Pipeline([("scale", StandardScaler()), ("logistic", LogisticRegression())])
    model.fit(X, y)
    predict = Predictor(model)
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
