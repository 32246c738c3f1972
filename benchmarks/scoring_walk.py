"""What scoring costs an operation in the engine, by forest size (issue 14).

    .venv/bin/python -m benchmarks.scoring_walk [--workdir /tmp/fg-ml-quality] [--repeat 3]

The drain benchmark's ratio (`benchmarks.drain --scoring`) is the target, but on two
cores shared with the broker its runs spread more than the walk's share of them. This
measures the walk alone, on the causal scenario's log that `benchmarks.ml_quality`
builds (built here too if missing): a forest of each size trained on the first 80% of
the time, as `fieldgate ml train` trains it, then the engine's served form
(`ml.serving`) scores the holdout in commit batches of 3,500, with the hints'
reasons for the rows at or above the default `ml.hint_threshold` (0.7), as
`ml.scoring.Scorer.score` does. Prints CPU per operation for each size and the
ratio of the current size (`ml.train`'s constants) to the baseline, the size before
it (100 trees of depth 16).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_sample_weight

from benchmarks.causal_log import build
from benchmarks.ml_quality import causal_url, log, read_dataset, time_holdout
from ml import serving
from ml.scoring import reasons
from ml.train import FOREST_MAX_DEPTH, FOREST_MIN_LEAF, FOREST_TREES
from storage.db import create_engine

BASELINE = (100, 16)
BATCH = 3_500
HINT_THRESHOLD = 0.7


def cpu_per_op(model: serving.Model, batches: list[np.ndarray], with_reasons: bool) -> float:
    """CPU microseconds an operation to score `batches` (and their hints' reasons)."""
    started = time.process_time()
    for batch in batches:
        risks = model(batch)
        hinted = np.flatnonzero(risks >= HINT_THRESHOLD)
        if with_reasons and len(hinted):
            reasons(model, batch[hinted], risks[hinted])
    return (time.process_time() - started) / sum(len(b) for b in batches) * 1e6


async def main_async(args: argparse.Namespace) -> None:
    url = causal_url(args.workdir, args.ops)
    await build(url, args.ops, log)
    engine = create_engine(url)
    try:
        _, dataset = await read_dataset(engine)
    finally:
        await engine.dispose()
    holdout = time_holdout(dataset.stored_at)
    X, y = dataset.X, dataset.y
    weights = compute_sample_weight("balanced", y[~holdout])
    held = X[holdout]
    batches = [held[i : i + BATCH] for i in range(0, len(held), BATCH)]
    sizes = {"baseline": BASELINE, "current": (FOREST_TREES, FOREST_MAX_DEPTH)}
    figures: dict[str, dict[str, list[float]]] = {}
    for name, (trees, depth) in sizes.items():
        forest = RandomForestClassifier(
            n_estimators=trees,
            max_depth=depth,
            min_samples_leaf=FOREST_MIN_LEAF,
            random_state=args.seed,
            n_jobs=-1,
        )
        forest.fit(X[~holdout], y[~holdout], sample_weight=weights)
        model = serving.export(Pipeline([("forest", forest)]))
        risks = model(held)
        auc = float(roc_auc_score(y[holdout], risks))
        share = float(np.mean(risks >= HINT_THRESHOLD))
        log(
            f"{name}: {trees} trees of depth {depth}, holdout ROC AUC {auc:.4f}, hinted {share:.2f}"
        )
        figures[name] = {"walk": [], "scoring": []}
        for _ in range(args.repeat):
            figures[name]["walk"].append(cpu_per_op(model, batches, with_reasons=False))
            figures[name]["scoring"].append(cpu_per_op(model, batches, with_reasons=True))
    print(f"{len(held):,} holdout operations in batches of {BATCH:,}; medians of {args.repeat}")
    print(f"{'forest':<24}{'walk us/op':>12}{'with reasons':>14}")
    medians = {}
    for name, (trees, depth) in sizes.items():
        walk = float(np.median(figures[name]["walk"]))
        scoring = float(np.median(figures[name]["scoring"]))
        medians[name] = scoring
        print(f"{f'{name} ({trees} x depth {depth})':<24}{walk:>12.2f}{scoring:>14.2f}")
    print(f"current / baseline, with reasons: {medians['current'] / medians['baseline']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fg-ml-quality"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
