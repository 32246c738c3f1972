"""`ml/train`, `ml/status`, `ml/models`, `ml/activate` over MQTT, against a daemon
process whose database holds a causal log stored through the real detection.

Training is a long command run in a worker process: its progress comes in order and
ends with the model, `model.trained` is published, and ingest keeps answering while
it runs. Activation checks the model's file first.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadgen.generator import GeneratorOptions
from tests.support import (
    Admin,
    Client,
    Daemon,
    Mosquitto,
    db_rows,
    free_port,
    send_one,
    stored,
    sync_op,
    wait_for,
)
from tests.support.ml_data import store_causal
from tests.test_metrics import scrape, value

MODEL_KEYS = {
    "model_id",
    "algorithm",
    "status",
    "created_at",
    "finished_at",
    "activated_at",
    "data_since",
    "data_until",
    "train_rows",
    "holdout_rows",
    "holdout_positives",
    "metrics",
    "baseline",
    "beats_baseline",
    "failure_reason",
}


@pytest.fixture(scope="module")
def causal_logs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """`causal_logs(ops)`: a causal log of that many operations, stored through the real
    detection once for the module; each test copies it."""
    built: dict[int, Path] = {}

    def log_of(ops: int) -> Path:
        if ops not in built:
            path = tmp_path_factory.mktemp("causal") / "log.db"
            options = GeneratorOptions(
                devices=8, entities=60, seed=2, max_ops=ops, payloads_per_s=0.05
            )
            url = f"sqlite+aiosqlite:///{path}"
            assert asyncio.run(store_causal(url, options, ops_per_commit=50)) == ops
            built[ops] = path
        return built[ops]

    return log_of


@pytest.fixture
def causal_daemon(
    tmp_path: Path,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    causal_logs: Callable[[int], Path],
) -> Callable[..., Daemon]:
    """`causal_daemon()`: a daemon on a copy of the module's causal log."""

    def start(ops: int = 2000, **env: str) -> Daemon:
        path = tmp_path / "log.db"
        shutil.copy(causal_logs(ops), path)
        return make_daemon(
            broker.port,
            f"sqlite+aiosqlite:///{path}",
            ML__MODELS_DIR=str(tmp_path / "models"),
            ML__MIN_ROWS="100",
            **env,
        )

    return start


def train(admin: Admin, **args: Any) -> dict[str, Any]:
    """The model one ml/train answered with."""
    answer = admin.answer("ml/train", admin.send("ml/train", args), timeout=120)
    assert answer["status"] == "ok", answer
    model: dict[str, Any] = answer["data"]["model"]
    return model


def test_a_training_run_reports_progress_in_order_announces_and_registers(
    causal_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = causal_daemon()
    admin = Admin(client, daemon.root)
    client.subscribe(f"{daemon.root}/admin/progress/#", f"{daemon.root}/ml/models")
    client.subscribe(f"{daemon.root}/devices/d1/sync/ack")

    transaction = admin.send("ml/train", {"algorithm": "logistic_regression"})
    # Ingest answers while the worker extracts and trains.
    assert send_one(client, daemon.root, "d1", sync_op("during-training")) == stored(
        "during-training", 1
    )
    answer = admin.answer("ml/train", transaction, timeout=120)
    accepted = [a for a in admin.answers("ml/train", transaction) if a["status"] == "accepted"]
    assert len(accepted) == 1
    assert answer["status"] == "ok", answer
    model = answer["data"]["model"]
    assert set(model) == MODEL_KEYS
    assert (model["status"], model["algorithm"]) == ("ready", "logistic_regression")
    assert set(model["metrics"]) == {
        "accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "pr_auc",
        "confusion_matrix",
    }
    assert model["train_rows"] + model["holdout_rows"] <= 2001

    progress = [
        m.json()
        for m in client.on(f"{daemon.root}/admin/progress/ml/train")
        if m.json()["transaction"] == transaction
    ]
    done = [p["done"] for p in progress]
    assert done == sorted(set(done)) and done[-1] == 100
    assert {p["total"] for p in progress} == {100}

    # The announcement leaves through the outbox, so it may follow the answer.
    (announced,) = wait_for(lambda: client.on(f"{daemon.root}/ml/models"))
    assert announced.json() == {"event": "model.trained", "model": model}

    models = admin.data("ml/models")
    assert [m["model_id"] for m in models["items"]] == [model["model_id"]]
    status = admin.data("ml/status")
    assert (status["training"], status["active"]) == (None, None)
    assert status["latest"]["model_id"] == model["model_id"]


def test_activation_checks_the_file_and_a_tampered_one_leaves_the_active_model(
    tmp_path: Path, causal_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = causal_daemon()
    admin = Admin(client, daemon.root)
    client.subscribe(f"{daemon.root}/admin/progress/#")
    first = train(admin, algorithm="logistic_regression")
    second = train(admin, algorithm="random_forest")
    activated = admin.data("ml/activate", model_id=first["model_id"])["model"]
    assert activated["status"] == "active"
    assert admin.data("ml/status")["active"]["model_id"] == first["model_id"]

    models_dir = tmp_path / "models"
    (path,) = [p for p in models_dir.iterdir() if p.name == f"{second['model_id']}.skops"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    error = admin.error("ml/activate", model_id=second["model_id"])
    assert error["code"] == "invalid_args" and error["path"] == "model_id"
    assert error["message"].startswith(f"model {second['model_id']} refused: ")
    assert admin.data("ml/status")["active"]["model_id"] == first["model_id"]

    assert admin.error("ml/activate", model_id="m_000000000000") == {
        "code": "invalid_args",
        "message": "no model m_000000000000",
        "path": "model_id",
    }


def offline_scores(daemon: Daemon, model: dict[str, Any], op_ids: list[str]) -> list[Any]:
    """(risk, reasons) of each op as the model's file and the training extraction of
    the daemon's log give them: what the daemon's acks and hints must say. The
    reasons here probe every feature through scikit-learn, one at a time (the
    daemon skips the probes that cannot change a score: they drop it by 0)."""
    from ml.dataset import FEATURES
    from ml.features import extract
    from ml.registry import load
    from ml.scoring import NEUTRAL, REASONS
    from storage.db import create_engine

    async def features() -> dict[str, Any]:
        engine = create_engine(daemon.db_url)
        try:
            dataset = await extract(engine, window_s=300.0, as_of_us=2**62)
        finally:
            await engine.dispose()
        return {op_id: dataset.X[i] for i, op_id in enumerate(dataset.op_ids)}

    rows = asyncio.run(features())
    (row,) = db_rows(
        daemon.db_url, "select file_path, sha256 from ml_models where id = ?", model["model_id"]
    )
    pipeline = load(row[0], row[1])
    if "n_jobs" in pipeline[-1].get_params():
        pipeline[-1].set_params(n_jobs=1)  # its trees summed in order, as served
    X = np.array([rows[op_id] for op_id in op_ids])
    risks = pipeline.predict_proba(X)[:, 1]
    drops = np.zeros(X.shape)
    for j, neutral in enumerate(NEUTRAL):
        probes = X.copy()
        probes[:, j] = neutral
        drops[:, j] = np.where(X[:, j] != neutral, risks - pipeline.predict_proba(probes)[:, 1], 0)
    order = np.argsort(-drops, axis=1, kind="stable")[:, :REASONS]
    why = [[FEATURES[j] for j in row] for row in order]
    return [(round(float(r), 4), w) for r, w in zip(risks, why, strict=True)]


def test_activation_scores_later_acks_and_hints_without_a_restart(
    causal_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Each ack's `risk` and each hint's reasons are the model's on the features the
    training extraction gives the same op (the skew test's promise, end to end); a
    model activated, another, then the first again (a rollback) each scores the very
    next op. Checked against: the scorer left on the model it first loaded."""
    port = free_port()
    daemon = causal_daemon(ML__HINT_THRESHOLD="0", METRICS__LISTEN=f"127.0.0.1:{port}")
    admin = Admin(client, daemon.root)
    client.subscribe(f"{daemon.root}/admin/progress/#", f"{daemon.root}/devices/d9/hints")
    client.subscribe(f"{daemon.root}/devices/d9/sync/ack")
    logistic = train(admin, algorithm="logistic_regression")
    forest = train(admin, algorithm="random_forest")

    def edit(op_id: str, version: int) -> dict[str, Any]:
        result = send_one(client, daemon.root, "d9", sync_op(op_id, entity_id="hot", user_id="u9"))
        assert {k: result[k] for k in ("op_id", "status", "version")} == stored(op_id, version)
        return result

    assert edit("before", 1) == stored("before", 1)
    sent: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for version, model in enumerate((logistic, forest, logistic), start=2):
        admin.data("ml/activate", model_id=model["model_id"])
        # The answer came once the engine had the model: health says so at once.
        assert admin.data("health")["checks"]["model"]["model_id"] == model["model_id"]
        op_id = f"with-{version}"
        sent.append((op_id, model, edit(op_id, version)))
    topic = f"{daemon.root}/devices/d9/hints"
    wait_for(lambda: len(client.on(topic)) == 3)
    hints = {m.json()["op_id"]: m.json() for m in client.on(topic)}
    for op_id, model, result in sent:
        ((risk, why),) = offline_scores(daemon, model, [op_id])
        assert result["risk"] == risk, model["algorithm"]
        assert hints[op_id] == {
            "op_id": op_id,
            "entity_type": "task",
            "entity_id": "hot",
            "risk": risk,
            "reasons": why,
        }

    def counted() -> tuple[float, float]:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")[1]
        return value(samples, "fieldgate_ml_scored_ops_total"), value(
            samples, "fieldgate_ml_hints_total"
        )

    wait_for(lambda: counted() == (3, 3))
    scoring = {
        "ok": True,
        "detail": f"scoring with {logistic['model_id']}",
        "model_id": logistic["model_id"],
    }
    wait_for(lambda: admin.data("health")["checks"]["model"] == scoring)

    # The active model's file changed while the daemon was down: refused at start,
    # said in health and the log; operations are stored and answered, unscored.
    daemon.stop()
    (row,) = db_rows(
        daemon.db_url, "select file_path from ml_models where id = ?", logistic["model_id"]
    )
    Path(row[0]).write_bytes(Path(row[0]).read_bytes() + b"tampered")
    daemon.start()
    assert edit("after-tamper", 5) == stored("after-tamper", 5)
    model_check = wait_for(
        lambda: (m := admin.data("health")["checks"]["model"])["ok"] is False and m
    )
    assert model_check["detail"].startswith("the active model is refused: ")
    assert "has changed since it was registered" in model_check["detail"]
    (refused,) = [
        e for e in daemon.log_lines() if e.get("event", "").startswith("the active model")
    ]
    assert refused["model_id"] == logistic["model_id"]


def test_a_run_without_enough_rows_ends_failed_with_its_reason(
    causal_daemon: Callable[..., Daemon], client: Client
) -> None:
    daemon = causal_daemon()
    admin = Admin(client, daemon.root)
    model = train(admin, since="2999-01-01T00:00:00Z")
    assert model["status"] == "failed"
    assert model["failure_reason"].startswith("too few rows: 0 operations")
    assert [key for key, value in model.items() if value is None] == [
        "activated_at",
        "data_since",
        "data_until",
        "train_rows",
        "holdout_rows",
        "holdout_positives",
        "metrics",
        "baseline",
        "beats_baseline",
    ]
    assert admin.data("ml/status")["training"] is None


def test_the_schedule_replaces_the_active_model_only_with_a_better_one(
    causal_daemon: Callable[..., Daemon], client: Client
) -> None:
    """`ml.retrain_interval_s`: a run that finds a model active judges it on the new
    model's holdout, and activates the new one only if it does better. On the same log
    with the same seed the new model is the same model: it does not do better, and
    the active one stays.

    Checked against: a schedule that activated every new model."""
    daemon = causal_daemon()
    admin = Admin(client, daemon.root)
    first = train(admin)
    admin.data("ml/activate", model_id=first["model_id"])
    daemon.stop()
    daemon.env["FIELDGATE_ML__RETRAIN_INTERVAL_S"] = "1"
    daemon.start()

    def scheduled_run() -> dict[str, Any] | None:
        newest = admin.data("ml/models")["items"][0]
        done = newest["model_id"] != first["model_id"] and newest["status"] != "training"
        return newest if done else None

    scheduled = wait_for(scheduled_run, timeout=120)
    wait_for(lambda: "scheduled model" in daemon.log())
    assert scheduled["status"] == "ready"
    assert admin.data("ml/status")["active"]["model_id"] == first["model_id"]
    said = [line for line in daemon.log_lines() if line.get("event") == "scheduled model"]
    assert said[0]["model_id"] == scheduled["model_id"]
    assert said[0]["activated"] is False
    roc = scheduled["metrics"]["roc_auc"]
    assert said[0]["why"] == (
        f"ROC AUC {roc:.3f}, active {first['model_id']} {roc:.3f} on the same holdout"
    )
