"""`fieldgate ml`: train a conflict model offline, list the registry, write a report.

These run against the configured database directly, not through the daemon: a
training run reads the whole log, and an operator may train and judge models on
a copy of the database, away from the one serving. The daemon's own `ml/*`
commands call the same functions (ml/pipeline.py, storage/ml_models.py).

scikit-learn takes seconds to import: it is imported inside the commands, so that
every other `fieldgate` command starts as fast as before.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.cli.ml_views import models_view
from gateway.cli.options import EXIT_USAGE, ConfigOption, load_settings
from handlers.times import rfc3339, to_us

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from storage.ml_models import ModelRow

app = typer.Typer(
    help="Conflict prediction: train models, list them, report on one.", no_args_is_help=True
)

EXIT_FAILED = 1

_MEASURES = ("roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy")


def _since(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a time: write it as 2026-11-01T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{value!r} has no zone: add Z for UTC")
    return to_us(moment)


async def _engine(url: str) -> AsyncEngine:
    """The database, if its schema has the registry; else exit 2 saying what to run."""
    from storage import migrate
    from storage.db import create_engine

    current, head = await migrate.current(url), migrate.head()
    if current != head:
        typer.echo(
            f"fieldgate: the database is at schema {current or 'empty'}, not {head}:"
            " run `fieldgate db upgrade` first",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    return create_engine(url)


@app.command()
def train(
    algorithm: Annotated[
        Literal["random_forest", "logistic_regression"] | None,
        typer.Option(help="The model to fit [default: ml.algorithm]", show_default=False),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Learn only from operations stored from this time (RFC 3339)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the splits and the forest.")] = 0,
    config_path: ConfigOption = None,
) -> None:
    """Train a model on the stored sync log and register it (status ready or failed)."""
    from ml.pipeline import params_from_settings, train_and_register

    settings = load_settings(config_path)
    overrides: dict[str, Any] = {"since_us": _since(since), "seed": seed, "n_jobs": -1}
    if algorithm is not None:
        overrides["algorithm"] = algorithm
    params = params_from_settings(settings, **overrides)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    bar = progress.add_task("starting", total=None)

    def advance(stage: str, done: int, total: int) -> None:
        progress.update(bar, description=stage, completed=done, total=total or None)

    async def main() -> ModelRow:
        engine = await _engine(settings.database.url)
        try:
            return await train_and_register(engine, params, advance)
        finally:
            await engine.dispose()

    with progress:
        row = asyncio.run(main())
    Console().print(*summary(row))
    if row.status == "failed":
        raise typer.Exit(EXIT_FAILED)


def summary(row: ModelRow) -> list[Any]:
    """What a training run gave: the model, its data, and its holdout metrics beside
    the baseline's, with the verdict; or why it failed."""
    if row.status == "failed":
        return [f"[red]model {row.id} failed[/red]: {row.failure_reason}"]
    assert row.window is not None and row.metrics is not None  # a ready row has them
    assert row.baseline_metrics is not None
    window, metrics, baseline = row.window, row.metrics, row.baseline_metrics
    rows = window.train_rows + window.holdout_rows
    positives = window.train_positives + window.holdout_positives
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", f"{row.id} ({row.algorithm}, {row.status})")
    facts.add_row(
        "data",
        f"{rfc3339(window.since_us, 0)} .. {rfc3339(window.until_us, 0)}",
    )
    facts.add_row(
        "rows",
        f"{rows}: {window.train_rows} to train, {window.holdout_rows} held out"
        f" (from {rfc3339(window.holdout_from_us, 0)})",
    )
    facts.add_row("conflict members", f"{positives} ({_percent(positives, rows)})")
    facts.add_row("file", f"{row.file_path}")
    table = Table(title="time-ordered holdout (the latest 20%)", title_justify="left")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column(f"baseline: {baseline['feature']}", justify="right")
    table.add_column("model, stratified split", justify="right", style="dim")
    for name in _MEASURES:
        table.add_row(
            name,
            f"{metrics['holdout'][name]:.3f}",
            f"{baseline['holdout'][name]:.3f}",
            f"{metrics['stratified'][name]:.3f}",
        )
    from ml.train import beats_baseline

    verdict = (
        "[green]beats the baseline[/green]"
        if beats_baseline(metrics, baseline)
        else "[red]does not beat the baseline[/red]: do not activate it"
    )
    return [facts, table, f"verdict: the model {verdict} (holdout ROC AUC)"]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


@app.command()
def models(
    json_output: Annotated[bool, typer.Option("--json-output", help="print JSON")] = False,
    config_path: ConfigOption = None,
) -> None:
    """List the registered models, newest first."""
    from storage import ml_models

    settings = load_settings(config_path)

    async def main() -> list[ModelRow]:
        engine = await _engine(settings.database.url)
        try:
            return await ml_models.list_models(engine)
        finally:
            await engine.dispose()

    rows = asyncio.run(main())
    if json_output or not sys.stdout.isatty():
        typer.echo(json.dumps([row.as_dict() for row in rows]))
        return
    console = Console()
    console.print(*models_view([ml_models.shown(row) for row in rows], console.width))


@app.command()
def report(
    model_id: Annotated[str, typer.Argument(help="The model, e.g. m_3f2a9c01b7de.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write into.")],
    config_path: ConfigOption = None,
) -> None:
    """Write a model's report: report.md and its pictures (ROC, PR, importances,
    calibration, scores), from the holdout it was judged on."""
    from ml import registry
    from ml.report import write_report
    from ml.serving import ModelRefused
    from storage import ml_models

    settings = load_settings(config_path)

    async def main() -> ModelRow | None:
        engine = await _engine(settings.database.url)
        try:
            return await ml_models.get(engine, model_id)
        finally:
            await engine.dispose()

    row = asyncio.run(main())
    if row is None:
        typer.echo(f"fieldgate: no model {model_id}", err=True)
        raise typer.Exit(EXIT_FAILED)
    if row.file_path is None:
        typer.echo(f"fieldgate: model {model_id} is {row.status}: nothing to report", err=True)
        raise typer.Exit(EXIT_FAILED)
    try:
        holdout = registry.load_holdout(row.file_path)
    except ModelRefused as exc:
        typer.echo(f"fieldgate: {exc.reason}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    written = write_report(row, holdout, out)
    typer.echo(f"wrote {len(written)} files to {out}: open {out / 'report.md'}")
