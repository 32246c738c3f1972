"""The model as the engine scores with it: scikit-learn's fitted numbers as plain
arrays, evaluated with numpy, so that the engine never imports scikit-learn.

Importing scikit-learn (and skops to read its file) costs the engine ~1.4 s of CPU
and ~150 MiB at a start with a model active, while a backlog waits for its first
answer: the drain benchmark's one failing cost of scoring (docs/decisions/
0016-serving-arrays.md). Training saves, beside the skops file the registry keeps,
a `.serving.npz` of the same model; its sha256 is the registry row's
`serving_sha256`, and it is written only if it gives scikit-learn's
`predict_proba` on a probe of the features' ranges.

A forest is every tree's nodes in one array, walked level by level for a chunk of
rows and every tree at once, comparing each row's value as float32 (as
scikit-learn's trees do) with the node's threshold; the trees' probabilities are
summed in tree order and divided by their number, which is `predict_proba`'s
arithmetic with `n_jobs=1`. A logistic regression is the scaler's and the
regression's coefficients.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ml.dataset import FEATURES

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
Bools = npt.NDArray[np.bool_]
Index = npt.NDArray[np.intp]

CHUNK = 1024
"""Rows walked at once, so that a chunk's rows x trees indices stay in the CPU's
caches (50 trees of depth 12, ml.train's, on the causal holdout's batches: 3.3 us a
row at 512 rows and at 1,024, 3.8 at 256; with the hints' reasons 6.1 at 1,024
against 6.4 at 512. 100 trees of depth 16: 4.1 us a row at 512, 4.6 at 1,024)."""

COMPACT_AT = frozenset({6, 8, 10})
"""Levels at which the walk of a forest deeper than COMPACT_DEPTH drops the (row,
tree) pairs already on their leaf: in 100 trees of depth 16 (ml.train's until
2026-12-07, and still served when such a model is active) most paths end early (59%
still walking at level 6, 18% at 8, 8% at 10), and every level costs each pair still
carried; dropping costs a level."""

COMPACT_DEPTH = 12
"""Down to this depth, dropping costs more than it saves: 50 trees of depth 12 walk
in 3.0 us a row without it, 3.8 with it at COMPACT_AT."""

TOLERANCE = 1e-9
"""How far a served score may be from `predict_proba`'s: a forest trained with
`n_jobs` > 1 sums its trees in whatever order its threads finish, one ulp apart."""

_PROBE_RANGES = np.array([20.0, 200.0, 1.0, 500.0, 1.0])
"""Per feature, the span of the probe that checks an export: past every value the
features take in practice (counts, hours up to the cap, rates and shares)."""


class ModelRefused(Exception):
    """A model file that will not be loaded, and why (one line)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Forest:
    """Every tree's nodes, concatenated: `roots[t]` is tree t's first node. A leaf
    has threshold +inf and both children itself, so a walk of `depth` levels ends
    every row on its leaf whatever the depth at which it got there."""

    feature: Index
    threshold: F32
    """scikit-learn's float64 threshold rounded down to a float32: for a float32
    value x, x <= t exactly when x <= the float32 at or below t, so comparing in
    float32 moves half the bytes and gives the same branch."""
    children: Index
    """2 x nodes: `children[2 * node + (value > threshold)]`."""
    value: F64
    """Each node's probability of a conflict (meaningful at leaves)."""
    roots: Index
    depth: int

    def __call__(self, X: F64) -> F64:
        """The probability of a conflict of each row of X (FEATURES' order)."""
        out = np.empty(len(X), dtype=np.float64)
        for start in range(0, len(X), CHUNK):
            out[start : start + CHUNK] = self._walk(X[start : start + CHUNK])
        return out

    @functools.cached_property
    def inner(self) -> Bools:
        """Per node, whether it is not a leaf (a leaf's children are itself)."""
        return np.asarray(self.children[0::2] != np.arange(len(self.value)))

    def changes(self, column: int, values: F64, to: float) -> Bools:
        """Per value of feature `column`, whether setting it to `to` can change its
        row's score: only if some node compares that feature with a threshold
        between the two (a node sends x right when x > t: x and `to` part at t
        exactly when the smaller <= t < the larger, in float32 as the walk does).
        Where not, every tree ends on the same leaf and the score is the same."""
        splits = self.splits[column]
        ours, theirs = values.astype(np.float32), np.float32(to)
        low, high = np.minimum(ours, theirs), np.maximum(ours, theirs)
        return np.asarray(np.searchsorted(splits, high) > np.searchsorted(splits, low))

    @functools.cached_property
    def splits(self) -> list[F32]:
        """Per feature, the sorted thresholds the forest's nodes compare it with."""
        return [
            np.unique(self.threshold[self.inner & (self.feature == column)])
            for column in range(len(FEATURES))
        ]

    def _walk(self, X: F64) -> F64:
        rows, trees = len(X), len(self.roots)
        values = np.ascontiguousarray(X, dtype=np.float32).ravel()
        node = np.tile(self.roots, rows)
        base = np.repeat(np.arange(rows, dtype=np.intp) * X.shape[1], trees)
        leaf = np.empty_like(node)
        where = np.arange(len(node))
        compact_at = COMPACT_AT if self.depth > COMPACT_DEPTH else frozenset()
        for level in range(self.depth):
            if level in compact_at:
                leaf[where] = node
                walking = self.inner[node]
                node, base, where = node[walking], base[walking], where[walking]
            column = np.take(self.feature, node, mode="clip")
            column += base
            right = np.take(values, column, mode="clip") > np.take(
                self.threshold, node, mode="clip"
            )
            node *= 2
            node += right
            np.take(self.children, node, out=node, mode="clip")
        leaf[where] = node
        leaves = self.value[leaf].reshape(rows, trees)
        total = np.zeros(rows, dtype=np.float64)
        for tree in range(trees):
            total += leaves[:, tree]
        total /= trees
        return total


@dataclass(frozen=True)
class Logistic:
    """StandardScaler then LogisticRegression: expit(((x - mean) / scale) . coef + b)."""

    mean: F64
    scale: F64
    coef: F64
    intercept: float

    def changes(self, column: int, values: F64, to: float) -> Bools:
        """Per value of feature `column`, whether setting it to `to` can change its
        row's score: whenever it is another value."""
        return np.asarray(values != to)

    def __call__(self, X: F64) -> F64:
        scores = ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef
        scores += self.intercept
        probabilities: F64 = 1.0 / (1.0 + np.exp(-scores))
        return probabilities


Model = Forest | Logistic


def export(pipeline: Pipeline) -> Model:
    """The served form of one of ml/train.py's two Pipelines, checked against its
    `predict_proba` on a probe of the features' ranges. Raises ValueError when the
    Pipeline is neither, or when the two disagree."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    final = pipeline[-1]
    model: Model
    if len(pipeline) == 1 and isinstance(final, RandomForestClassifier):
        model = _forest([estimator.tree_ for estimator in final.estimators_])
    elif (
        len(pipeline) == 2
        and isinstance(pipeline[0], StandardScaler)
        and isinstance(final, LogisticRegression)
    ):
        scaler = pipeline[0]
        model = Logistic(
            mean=np.asarray(scaler.mean_, dtype=np.float64),
            scale=np.asarray(scaler.scale_, dtype=np.float64),
            coef=np.asarray(final.coef_, dtype=np.float64).reshape(-1),
            intercept=float(final.intercept_[0]),
        )
    else:
        raise ValueError(f"no served form for {[type(step).__name__ for step in pipeline]}")
    probe = np.random.default_rng(0).uniform(0, 1, (512, len(FEATURES))) * _PROBE_RANGES
    probe[:, [0, 3]] = np.floor(probe[:, [0, 3]])
    gap = float(np.max(np.abs(model(probe) - pipeline.predict_proba(probe)[:, 1])))
    if gap > TOLERANCE:
        raise ValueError(f"the served model is {gap:.3g} from predict_proba on the probe")
    return model


def _forest(trees: list[Any]) -> Forest:
    sizes = [tree.node_count for tree in trees]
    roots = np.cumsum([0, *sizes[:-1]]).astype(np.intp)
    count = sum(sizes)
    feature = np.zeros(count, dtype=np.intp)
    threshold = np.empty(count, dtype=np.float64)
    children = np.empty(2 * count, dtype=np.intp)
    value = np.empty(count, dtype=np.float64)
    for root, tree in zip(roots.tolist(), trees, strict=True):
        nodes = np.arange(tree.node_count, dtype=np.intp)
        leaf = tree.children_left == -1
        at = slice(root, root + tree.node_count)
        feature[at] = np.where(leaf, 0, tree.feature)
        threshold[at] = np.where(leaf, np.inf, tree.threshold)
        children[2 * (nodes + root)] = np.where(leaf, nodes, tree.children_left) + root
        children[2 * (nodes + root) + 1] = np.where(leaf, nodes, tree.children_right) + root
        value[at] = tree.value[:, 0, 1]
    depth = max(tree.max_depth for tree in trees)
    return Forest(feature, _round_down(threshold), children, value, roots, depth)


def _round_down(threshold: F64) -> F32:
    """Each threshold as the largest float32 at or below it."""
    rounded = threshold.astype(np.float32)
    above = rounded.astype(np.float64) > threshold
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


def dumps(model: Model) -> bytes:
    """The model as `.npz` bytes: its kind and its fields as plain arrays, read back
    without pickle."""
    arrays: dict[str, Any] = {
        "kind": np.array("forest" if isinstance(model, Forest) else "logistic")
    }
    arrays.update({field.name: np.asarray(getattr(model, field.name)) for field in fields(model)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def serving_path(model_file: Path | str) -> Path:
    """Beside the registry's skops file: `<id>.serving.npz`."""
    return Path(model_file).with_suffix(".serving.npz")


def write(model: Model, model_file: Path) -> str:
    """Write the served form beside `model_file` (whole or not at all) and return its
    sha256."""
    data = dumps(model)
    write_atomically(serving_path(model_file), data)
    return hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Written aside, synced, renamed: a crash never leaves a half file to hash."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load(model_file: Path | str, sha256: str, serving_sha256: str | None) -> Model:
    """The served form of the registered model `model_file`, if both files' bytes
    hash to what the registry recorded. Raises ModelRefused otherwise.

    The skops file is only hashed here: its types were read when training wrote
    it, and a file changed since is refused by its hash. A model without its
    served form, registered before they existed (`serving_sha256` None) or whose
    `.serving.npz` is missing (a backup that kept only the skops files), is read
    through scikit-learn, types and all (ml.registry.load), and converted: the one
    case that imports it. A served form that is there but changed is refused."""
    path = serving_path(model_file)
    if serving_sha256 is None or not path.exists():
        from ml.registry import load as load_pipeline

        try:
            return export(load_pipeline(model_file, sha256))
        except ValueError as exc:
            raise ModelRefused(f"{model_file} cannot be served: {exc}") from None
    read_checked(model_file, sha256)
    data = read_checked(path, serving_sha256)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return _model(arrays)
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise ModelRefused(f"{path} is not a served model: {exc}") from None


def read_checked(path: Path | str, sha256: str) -> bytes:
    """The bytes of `path`, if they hash to `sha256`. Raises ModelRefused otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelRefused(f"cannot read {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelRefused(
            f"{path} has changed since it was registered: sha256 {digest[:12]}...,"
            f" registered {sha256[:12]}..."
        )
    return data


def _model(arrays: Any) -> Model:
    kind = str(arrays["kind"])
    if kind == "logistic":
        coef = arrays["coef"].astype(np.float64)
        if coef.shape != (len(FEATURES),):
            raise ValueError(f"{coef.shape[0]} coefficients for {len(FEATURES)} features")
        return Logistic(
            mean=arrays["mean"].astype(np.float64),
            scale=arrays["scale"].astype(np.float64),
            coef=coef,
            intercept=float(arrays["intercept"]),
        )
    if kind != "forest":
        raise ValueError(f"unknown kind {kind!r}")
    forest = Forest(
        feature=arrays["feature"].astype(np.intp),
        threshold=arrays["threshold"].astype(np.float32),
        children=arrays["children"].astype(np.intp),
        value=arrays["value"].astype(np.float64),
        roots=arrays["roots"].astype(np.intp),
        depth=int(arrays["depth"]),
    )
    nodes = len(forest.value)
    # The walk takes indices unchecked (mode="clip"): they are checked once here.
    if not (
        len(forest.feature) == len(forest.threshold) == nodes
        and len(forest.children) == 2 * nodes
        and len(forest.roots) > 0
        and 0 <= forest.depth <= nodes
        and _within(forest.feature, len(FEATURES))
        and _within(forest.children, nodes)
        and _within(forest.roots, nodes)
    ):
        raise ValueError("its arrays do not make a forest over the features")
    return forest


def _within(indices: Index, bound: int) -> bool:
    return bool(len(indices) == 0 or (indices.min() >= 0 and indices.max() < bound))
