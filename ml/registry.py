"""Model files: saved with skops, loaded only if they are the bytes registered and hold
only the types a conflict model is made of.

A pickle runs whatever its bytes say on load. skops stores the object tree as data
and refuses to build a type it was not told to trust; here the types trusted are an
explicit allow-list (what our two Pipelines hold), never whatever a file asks for,
and the file's sha256 must be the one the registry row recorded. A file changed on
disk, replaced, or holding anything else is refused with the reason (ModelRefused),
and the caller keeps the model it has.

Beside each model, `<id>.holdout.npz` keeps the holdout's labels and scores for the
report, and `<id>.serving.npz` the model as the engine scores with it (ml/serving.py):
plain arrays, loaded without pickle.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from ml import serving
from ml.dataset import FEATURES
from ml.serving import ModelRefused, read_checked, write_atomically
from ml.train import Holdout, TrainingFailed

DEFAULT_MODELS_DIR = Path("var/models")
"""Where model files go unless `ml.models_dir` says otherwise."""

ALLOWED_TYPES: frozenset[str] = frozenset({"sklearn.tree._tree.Tree"})
"""The types our Pipelines hold that skops does not trust by itself: a forest's trees.
(Pipeline, StandardScaler, LogisticRegression, the forest and numpy arrays are in
skops' own trusted set.) A file asking for any other type is refused."""

_FINAL_STEPS = (RandomForestClassifier, LogisticRegression)


@dataclass(frozen=True)
class SavedModel:
    path: Path
    """Absolute: the daemon that loads it may run from another directory."""
    sha256: str
    serving_sha256: str
    """Of `serving.serving_path(path)`, the form the engine scores with."""


def model_path(models_dir: Path, model_id: str) -> Path:
    return (models_dir / f"{model_id}.skops").resolve()


def holdout_path(model_file: Path) -> Path:
    return model_file.with_suffix(".holdout.npz")


def save(pipeline: Pipeline, holdout: Holdout, models_dir: Path, model_id: str) -> SavedModel:
    """Write the model, its served form and its holdout scores; each file appears
    whole or not at all (written aside, synced, renamed), so a crash never leaves a
    half file to hash. Raises TrainingFailed when the model has no served form that
    gives its scores."""
    try:
        served = serving.export(pipeline)
    except ValueError as exc:
        raise TrainingFailed(f"the model cannot be served: {exc}") from None
    path = model_path(models_dir, model_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = sio.dumps(pipeline, compression=zipfile.ZIP_DEFLATED)
    write_atomically(path, data)
    serving_sha256 = serving.write(served, path)
    scores = io.BytesIO()
    np.savez(
        scores,
        y=holdout.y,
        model_scores=holdout.model_scores,
        baseline_scores=holdout.baseline_scores,
    )
    write_atomically(holdout_path(path), scores.getvalue())
    return SavedModel(
        path=path, sha256=hashlib.sha256(data).hexdigest(), serving_sha256=serving_sha256
    )


def load(path: Path | str, sha256: str) -> Pipeline:
    """The Pipeline in `path`, if its bytes hash to `sha256` and it holds only
    ALLOWED_TYPES beyond skops' own, ending in one of our two estimators on our
    five features. Raises ModelRefused otherwise."""
    data = read_checked(path, sha256)
    try:
        untrusted = set(sio.get_untrusted_types(data=data))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a refusal
        raise ModelRefused(f"{path} is not a readable skops file: {exc}") from None
    unexpected = sorted(untrusted - ALLOWED_TYPES)
    if unexpected:
        raise ModelRefused(f"{path} holds types not allowed in a model: {', '.join(unexpected)}")
    try:
        model = sio.loads(data, trusted=sorted(untrusted))
    except Exception as exc:  # noqa: BLE001 - any load failure is a refusal
        raise ModelRefused(f"{path} could not be loaded: {exc}") from None
    if not isinstance(model, Pipeline) or not isinstance(model[-1], _FINAL_STEPS):
        raise ModelRefused(f"{path} is not a conflict model: it holds {type(model).__name__}")
    if getattr(model, "n_features_in_", None) != len(FEATURES):
        raise ModelRefused(f"{path} was not trained on the {len(FEATURES)} features")
    return model


def load_holdout(model_file: Path | str) -> Holdout:
    try:
        with np.load(holdout_path(Path(model_file)), allow_pickle=False) as arrays:
            return Holdout(
                y=arrays["y"].astype(np.int8),
                model_scores=arrays["model_scores"].astype(np.float64),
                baseline_scores=arrays["baseline_scores"].astype(np.float64),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise ModelRefused(f"the holdout scores of {model_file} are unreadable: {exc}") from None
