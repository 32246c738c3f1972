"""A model's report for a person: five pictures and a page that says whether the model
is worth serving.

Everything is drawn from what training measured on the time-ordered holdout (the
labels and scores kept beside the model file), not from a new extraction: the
report shows the numbers the registry holds, and labels change as conflicts grow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, and safe off the main thread

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from handlers.times import rfc3339
from ml.dataset import FEATURES
from ml.train import METRICS, Holdout, beats_baseline
from storage.ml_models import DataWindow, ModelRow

PICTURES: tuple[tuple[str, str], ...] = (
    ("roc.png", "ROC curve"),
    ("pr.png", "Precision-recall curve"),
    ("importances.png", "Feature importances"),
    ("calibration.png", "Calibration"),
    ("scores.png", "Score distribution"),
)
"""The files and their headings in report.md, in reading order."""

_CALIBRATION_BINS = 10


def write_report(model: ModelRow, holdout: Holdout, out_dir: Path) -> list[Path]:
    """Write the pictures and `report.md` into `out_dir`; returns the files written.

    `model` must be a trained row (ready or active): its metrics and data window.
    """
    if model.metrics is None or model.baseline_metrics is None or model.window is None:
        raise ValueError(f"model {model.id} is {model.status}: it has no metrics to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    feature = str(model.baseline_metrics["feature"])
    figures = {
        "roc.png": _roc(holdout, feature),
        "pr.png": _precision_recall(holdout, feature),
        "importances.png": _importances(model.metrics["importances"], model.algorithm),
        "calibration.png": _calibration(holdout, feature),
        "scores.png": _scores(holdout),
    }
    written = []
    for name, figure in figures.items():
        path = out_dir / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    page = out_dir / "report.md"
    page.write_text(
        _markdown(model, model.metrics, model.baseline_metrics, model.window), encoding="utf-8"
    )
    return [*written, page]


def _markdown(
    model: ModelRow, metrics: dict[str, Any], baseline: dict[str, Any], window: DataWindow
) -> str:
    feature = baseline["feature"]
    held, base = metrics["holdout"], baseline["holdout"]
    rows = window.train_rows + window.holdout_rows
    positives = window.train_positives + window.holdout_positives
    verdict = (
        f"**Verdict: the model beats the baseline** (holdout ROC AUC {held['roc_auc']:.3f}"
        f" against {base['roc_auc']:.3f} for `{feature}` alone)."
        if beats_baseline(metrics, baseline)
        else f"**Verdict: the model does not beat the baseline** (holdout ROC AUC"
        f" {held['roc_auc']:.3f} against {base['roc_auc']:.3f} for `{feature}` alone):"
        " it has learned nothing that one feature does not say; do not activate it."
    )
    lines = [
        f"# Conflict model {model.id}",
        "",
        verdict,
        "",
        f"A {model.algorithm.replace('_', ' ')} (seed {model.seed}) that scores how likely"
        " a stored sync operation is to become a member of a conflict, from the five"
        f" features ({', '.join(f'`{name}`' for name in FEATURES)}). Status: {model.status};"
        f" trained {rfc3339(model.created_at, 0)}.",
        "",
        "## Data",
        "",
        f"- Operations committed from {rfc3339(window.since_us, 0)} to"
        f" {rfc3339(window.until_us, 0)}: {rows}, of which {positives} conflict members"
        f" ({_share(positives, rows)}).",
        f"- Trained on the first {window.train_rows} ({window.train_positives} members,"
        f" {_share(window.train_positives, window.train_rows)}); judged on the"
        f" {window.holdout_rows} committed from {rfc3339(window.holdout_from_us, 0)} on"
        f" ({window.holdout_positives} members,"
        f" {_share(window.holdout_positives, window.holdout_rows)}): the time-ordered"
        " holdout, later than everything the model learned from, as in service.",
        "",
        "## Holdout metrics",
        "",
        f"| metric | model | baseline (`{feature}`) |",
        "|---|---:|---:|",
        *(
            f"| {name} | {held[name]:.3f} | {base[name]:.3f} |"
            for name in METRICS
            if name != "confusion_matrix"
        ),
        f"| confusion [[tn, fp], [fn, tp]] | {held['confusion_matrix']} |"
        f" {base['confusion_matrix']} |",
        "",
        "Thresholded metrics cut the probability at 0.5; PR AUC is the average precision."
        f" On a stratified random split instead, the model's ROC AUC would read"
        f" {metrics['stratified']['roc_auc']:.3f} and PR AUC"
        f" {metrics['stratified']['pr_auc']:.3f}: that split lets the model learn from"
        " the neighbours in time of what it is judged on, so it is shown here only"
        " to be compared.",
        "",
    ]
    for name, heading in PICTURES:
        lines += [f"## {heading}", "", f"![{heading}]({name})", "", _CAPTIONS[name], ""]
    return "\n".join(lines)


_CAPTIONS = {
    "roc.png": "True against false positive rate at every cut, model and baseline: the"
    " higher curve ranks conflicts above the rest more often (the area is the ROC AUC).",
    "pr.png": "Precision against recall at every cut: when conflicts are few this shows"
    " what the ROC curve hides, how many warnings are right. The dotted line is the share of"
    " conflict members, what guessing gives.",
    "importances.png": "How much each feature weighs in the model (forest: impurity"
    " importances; logistic regression: |coefficient| on standardised features),"
    " scaled to sum to 1.",
    "calibration.png": "Observed share of conflict members against the predicted"
    " probability, by deciles of the score. Balanced class weights move a model's"
    " probabilities away from the observed rates (up when conflicts are rare): a curve"
    " off the diagonal says the `risk` over- or understates, so read it as a rank, and"
    " set `ml.hint_threshold` from this picture.",
    "scores.png": "The model's scores of the holdout's conflict members and of the rest:"
    " the less they overlap, the better a threshold separates them.",
}


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _figure(title: str) -> tuple[Figure, Any]:
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.set_title(title)
    return figure, axes


def _roc(holdout: Holdout, feature: str) -> Figure:
    figure, axes = _figure("ROC curve (time-ordered holdout)")
    for scores, label in ((holdout.model_scores, "model"), (holdout.baseline_scores, feature)):
        fpr, tpr, _ = roc_curve(holdout.y, scores)
        axes.plot(fpr, tpr, label=label)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.legend(loc="lower right")
    return figure


def _precision_recall(holdout: Holdout, feature: str) -> Figure:
    figure, axes = _figure("Precision-recall (time-ordered holdout)")
    for scores, label in ((holdout.model_scores, "model"), (holdout.baseline_scores, feature)):
        precision, recall, _ = precision_recall_curve(holdout.y, scores)
        axes.step(recall, precision, where="post", label=label)
    axes.axhline(float(np.mean(holdout.y)), linestyle=":", color="grey", label="share of members")
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="upper right")
    return figure


def _importances(importances: dict[str, float], algorithm: str) -> Figure:
    kind = "impurity" if algorithm == "random_forest" else "|coefficient|, scaled features"
    figure, axes = _figure(f"Feature importances ({kind})")
    names = list(FEATURES)[::-1]
    axes.barh(names, [importances[name] for name in names])
    axes.set_xlabel("share of importance")
    return figure


def _calibration(holdout: Holdout, feature: str) -> Figure:
    figure, axes = _figure("Calibration (time-ordered holdout)")
    for scores, label in ((holdout.model_scores, "model"), (holdout.baseline_scores, feature)):
        observed, predicted = calibration_curve(
            holdout.y, scores, n_bins=_CALIBRATION_BINS, strategy="quantile"
        )
        axes.plot(predicted, observed, marker="o", label=label)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    axes.set_xlabel("predicted probability")
    axes.set_ylabel("observed share of conflict members")
    axes.legend(loc="best")
    return figure


def _scores(holdout: Holdout) -> Figure:
    figure, axes = _figure("Model scores by class (time-ordered holdout)")
    bins = np.linspace(0, 1, 41)
    members = holdout.y == 1
    axes.hist(holdout.model_scores[~members], bins=bins, density=True, alpha=0.6, label="others")
    axes.hist(
        holdout.model_scores[members], bins=bins, density=True, alpha=0.6, label="conflict members"
    )
    axes.set_xlabel("model score (probability of a conflict)")
    axes.set_ylabel("density")
    axes.legend(loc="upper center")
    return figure
