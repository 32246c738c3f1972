"""Conflict prediction's answers as an operator reads them: `ml/models` one line per
model, `ml/train` and `ml/activate` the model's figures beside the baseline's with
the verdict, `ml/status` what trains now and what is active. The models come as
`storage.ml_models.shown` gives them, from the admin answers and from the CLI's own
`fieldgate ml models` alike.
"""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from gateway.cli.cells import Columns, fitted, line_table, when

MEASURES = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc")

_MODEL_COLUMNS: Columns = (
    ("id", "left"),
    ("algorithm", "left"),
    ("status", "left"),
    ("rows", "right"),
    ("ROC AUC", "right"),
    ("PR AUC", "right"),
    ("baseline", "right"),
    ("created", "left"),
)
"""`baseline`: the best single feature's holdout ROC AUC."""

_SHORT_NAMES = {"random_forest": "forest", "logistic_regression": "logistic"}


def models_view(models: list[dict[str, Any]], width: int) -> list[Any]:
    """One line per model (as `storage.ml_models.shown` gives it: the CLI's own listing
    and `fieldgate admin ml/models` alike), within the terminal (the time gives way
    first, then the algorithm; the id, what one types next, never); each failed
    model's reason on a line of its own below."""
    cells = []
    for model in models:
        held = model["metrics"] or {}
        base = model["baseline"] or {}
        rows = model["train_rows"]
        cells.append(
            (
                model["model_id"],
                _SHORT_NAMES.get(model["algorithm"], model["algorithm"]),
                model["status"],
                "-" if rows is None else str(rows + model["holdout_rows"]),
                _number(held.get("roc_auc")),
                _number(held.get("pr_auc")),
                _number(base.get("roc_auc")),
                when(model["created_at"]),
            )
        )
    table = line_table(_MODEL_COLUMNS, fitted(_MODEL_COLUMNS, cells, width, [(7, 11), (1, 6)]))
    for line in cells:
        table.add_row(*line)
    if not models:
        return ["no models: train one with `fieldgate ml train`"]
    failures = [
        Text(f"{m['model_id']} failed: {m['failure_reason']}")
        for m in models
        if m["failure_reason"]
    ]
    return [table, *failures]


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def model_view(data: dict[str, Any], _width: int) -> list[RenderableType]:
    """`ml/train`, `ml/activate`: the model's facts, its holdout figures beside the
    baseline's, and the verdict; or why it failed."""
    return _model(data["model"])


def _model(model: dict[str, Any]) -> list[RenderableType]:
    if model["status"] == "failed":
        return [Text(f"model {model['model_id']} failed: {model['failure_reason']}", "red")]
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", f"{model['model_id']} ({model['algorithm']}, {model['status']})")
    facts.add_row("data", f"{when(model['data_since'])} .. {when(model['data_until'])}")
    facts.add_row(
        "rows", f"{model['train_rows']} to train, {model['holdout_rows']} held out (the latest)"
    )
    metrics, baseline = model["metrics"] or {}, model["baseline"] or {}
    table = Table(title="time-ordered holdout", title_justify="left")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column(f"baseline: {baseline.get('feature')}", justify="right")
    for name in MEASURES:
        table.add_row(name, _number(metrics.get(name)), _number(baseline.get(name)))
    verdict = (
        Text("verdict: the model beats the baseline (holdout ROC AUC)", "green")
        if model["beats_baseline"]
        else Text("verdict: the model does not beat the baseline: do not activate it", "red")
    )
    return [facts, table, verdict]


def status_view(data: dict[str, Any], _width: int) -> list[RenderableType]:
    """`ml/status`: the run under way, the active model, the latest one."""
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    run = data["training"]
    facts.add_row(
        "training",
        "none"
        if run is None
        else f"{run['algorithm']}: {run['stage']}, {run['done']}/{run['total']},"
        f" for {run['running_s']:.0f} s",
    )
    for key in ("active", "latest"):
        model = data[key]
        facts.add_row(key, "none" if model is None else _line(model))
    return [facts]


def _line(model: dict[str, Any]) -> str:
    held = (model["metrics"] or {}).get("roc_auc")
    base = (model["baseline"] or {}).get("roc_auc")
    figures = f", ROC AUC {_number(held)} (baseline {_number(base)})" if held is not None else ""
    return f"{model['model_id']} ({model['algorithm']}, {model['status']}){figures}"


def list_view(data: dict[str, Any], width: int) -> list[RenderableType]:
    """`ml/models`."""
    rendered: list[RenderableType] = models_view(data["items"], width)
    return rendered
