"""One training run from the sync log to a registered model: register (`training`),
extract, train, save, mark `ready`, or `failed` with the reason.

The CLI trains on a thread (offline, nothing else to protect); the daemon trains in
a worker process of its own (`in_process=True`), so that a forest's minutes of CPU
and its memory never touch ingest, and a crash of the worker is a failed model, not
a dead daemon. Either way cancelling the awaiting task stops training at its next
step and leaves the row `failed` with "cancelled".
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from handlers.times import now_us
from ml import registry
from ml.dataset import DEFAULT_FIRST_SYNC_HOURS, Dataset
from ml.features import extract
from ml.train import DEFAULT_MIN_ROWS, Algorithm, Progress, TrainingFailed, TrainResult, train
from ml.worker import Extraction, Incumbent
from ml.worker import main as worker_main
from storage import ml_models
from storage.ml_models import ModelRow

T = TypeVar("T")

DEFAULT_WINDOW_S = 300.0
"""`conflicts.window_s`'s default, for callers without settings."""


@dataclass(frozen=True)
class TrainParams:
    algorithm: Algorithm = "random_forest"
    models_dir: Path = registry.DEFAULT_MODELS_DIR
    window_s: float = DEFAULT_WINDOW_S
    first_sync_hours: float = DEFAULT_FIRST_SYNC_HOURS
    min_rows: int = DEFAULT_MIN_ROWS
    seed: int = 0
    since_us: int | None = None
    as_of_us: int | None = None
    n_jobs: int = 1
    incumbent: Incumbent | None = None
    """The active model, judged on the new model's holdout (in a worker only)."""


def params_from_settings(settings: Any, **overrides: Any) -> TrainParams:
    """TrainParams from the daemon's Settings (`conflicts.window_s`; `[ml]`'s
    `algorithm`, `models_dir`, `min_rows`, `first_sync_hours`), then `overrides`, the
    command's own arguments. Duck-typed: ml/ sits below gateway/ and never imports it."""
    section = settings.ml
    return replace(
        TrainParams(
            algorithm=section.algorithm,
            models_dir=Path(section.models_dir),
            window_s=float(settings.conflicts.window_s),
            first_sync_hours=float(section.first_sync_hours),
            min_rows=int(section.min_rows),
        ),
        **overrides,
    )


async def train_and_register(
    engine: AsyncEngine,
    params: TrainParams,
    progress: Progress | None = None,
    *,
    in_process: bool = False,
    database_url: str | None = None,
    announce: ml_models.Announce | None = None,
) -> ModelRow:
    """The run, end to end; returns the model's row, `ready` or `failed`.

    Progress stages: `extract` (as ml.features reports it), then train's own.
    Errors other than a training failure (the database gone) propagate, after the
    row is marked failed if the database still answers. `in_process` with the
    `database_url`: the worker process extracts too (the daemon's way). `announce`:
    the outbox rows written with the row's `ready` (ml_models.mark_ready).
    """
    row = await ml_models.register(engine, algorithm=params.algorithm, seed=params.seed)
    # A window closes with time, not with traffic: an edit W before now is labelled
    # for good even if nothing was stored since (a quiet night, a demo just ended).
    as_of_us = now_us() if params.as_of_us is None else params.as_of_us
    if in_process and database_url is not None:
        source = Extraction(
            database_url, params.window_s, params.first_sync_hours, params.since_us, as_of_us
        )
        training = _in_worker(source, params, progress)
        return await _finish(engine, row, params, training, announce)

    def extracted(done: int, total: int) -> None:
        if progress is not None:
            progress("extract", done, total)

    try:
        dataset = await extract(
            engine,
            window_s=params.window_s,
            first_sync_hours=params.first_sync_hours,
            since_us=params.since_us,
            as_of_us=as_of_us,
            progress=extracted,
        )
    except BaseException as exc:
        await _mark_failed_quietly(engine, row.id, _reason(exc, "extraction"))
        raise
    return await train_registered(
        engine, row, dataset, params, progress, in_process=in_process, announce=announce
    )


async def train_registered(
    engine: AsyncEngine,
    row: ModelRow,
    dataset: Dataset,
    params: TrainParams,
    progress: Progress | None = None,
    *,
    in_process: bool = False,
    announce: ml_models.Announce | None = None,
) -> ModelRow:
    """Train `row` (registered, `training`) on `dataset`, save it, and mark it: the
    second half of train_and_register, for a caller that has its dataset."""
    run = _in_worker if in_process else _on_thread
    return await _finish(engine, row, params, run(dataset, params, progress), announce)


async def _finish(
    engine: AsyncEngine,
    row: ModelRow,
    params: TrainParams,
    training: Awaitable[TrainResult],
    announce: ml_models.Announce | None = None,
) -> ModelRow:
    """Await the training, save what it made, and mark the row ready or failed."""
    try:
        result = await training
        saved = await asyncio.to_thread(
            registry.save, result.pipeline, result.holdout, params.models_dir, row.id
        )
    except TrainingFailed as exc:
        return await ml_models.mark_failed(engine, row.id, exc.reason)
    except BaseException as exc:
        await _mark_failed_quietly(engine, row.id, _reason(exc, "training"))
        raise
    return await ml_models.mark_ready(
        engine,
        row.id,
        window=result.window,
        metrics=result.metrics,
        baseline_metrics=result.baseline,
        file_path=str(saved.path),
        sha256=saved.sha256,
        serving_sha256=saved.serving_sha256,
        announce=announce,
    )


def _reason(exc: BaseException, stage: str) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return f"{stage} failed: {type(exc).__name__}: {exc}"


async def _mark_failed_quietly(engine: AsyncEngine, model_id: str, reason: str) -> None:
    """Mark the run failed, shielded from the cancellation that may have ended it; if
    the database is what failed, the original error is the one worth raising."""
    with contextlib.suppress(Exception):
        await asyncio.shield(ml_models.mark_failed(engine, model_id, reason))


async def _on_thread(
    dataset: Dataset, params: TrainParams, progress: Progress | None
) -> TrainResult:
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            loop.call_soon_threadsafe(progress, stage, done, total)

    return await _until_done(
        lambda: train(
            dataset,
            params.algorithm,
            seed=params.seed,
            progress=report,
            cancelled=stop.is_set,
            min_rows=params.min_rows,
            n_jobs=params.n_jobs,
        ),
        stop.set,
    )


async def _in_worker(
    source: Dataset | Extraction, params: TrainParams, progress: Progress | None
) -> TrainResult:
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=False)
    stop = context.Event()
    worker = context.Process(
        target=worker_main,
        args=(
            *(theirs, stop, source, params.algorithm, params.seed),
            *(params.min_rows, params.n_jobs, params.incumbent),
        ),
        name="fieldgate-ml-train",
    )
    worker.start()
    theirs.close()

    def read() -> tuple[Any, ...]:
        """Progress to the loop as it comes; the final message returned."""
        while True:
            try:
                message: tuple[Any, ...] = ours.recv()
            except EOFError:
                return ("died",)
            if message[0] != "progress":
                return message
            if progress is not None:
                loop.call_soon_threadsafe(progress, *message[1:])

    try:
        final = await _until_done(read, stop.set)
    finally:
        ours.close()
        await asyncio.to_thread(worker.join)
    match final:
        case ("done", TrainResult() as result):
            return result
        case ("failed", str(reason)):
            raise TrainingFailed(reason)
    raise TrainingFailed(f"the training process died (exit code {worker.exitcode})")


async def _until_done(blocking: Callable[[], T], stop: Callable[[], None]) -> T:
    """`blocking()` on a thread; cancelled, `stop()` asks it to end at its next step,
    and the thread is waited for, so that nothing trains on after the caller was
    told it stopped (and no file is closed under a thread that reads it)."""
    work = asyncio.ensure_future(asyncio.to_thread(blocking))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop()
        await asyncio.gather(work, return_exceptions=True)
        raise
