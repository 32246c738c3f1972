"""`fieldgate simulate`: the generator is deterministic, the runner's counts are exact."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from loadgen.generator import GeneratorOptions, Payload, expected_totals, generate
from loadgen.runner import Broker, RemoteHostRefused, RunOptions, check_loopback, run_simulation
from tests.support import ROOT, Daemon, Mosquitto

OPTIONS = GeneratorOptions(
    devices=4,
    entities=50,
    seed=1234,
    max_ops=400,
    batch_share=0.2,
    max_batch=8,
    conflict_share=0.2,
    malformed_share=0.05,
    duplicate_share=0.05,
)


def _fingerprint(payloads: list[Payload]) -> list[tuple[str, bytes, str]]:
    return [(p.device_id, p.body, p.kind) for p in payloads]


def test_generator_is_deterministic_from_its_seed() -> None:
    first = list(generate(OPTIONS))
    again = list(generate(OPTIONS))
    assert _fingerprint(first) == _fingerprint(again)
    other = list(generate(GeneratorOptions(**{**OPTIONS.__dict__, "seed": 1235})))
    assert _fingerprint(other) != _fingerprint(first)


def test_a_live_clock_changes_the_times_and_nothing_else() -> None:
    simulated = list(generate(OPTIONS))
    live = list(generate(OPTIONS, clock=lambda: 1_800_000_000_000_000))
    assert [p.expected for p in live] == [p.expected for p in simulated]
    assert [p.kind for p in live] == [p.kind for p in simulated]


def test_generator_makes_the_stream_it_promises() -> None:
    payloads = list(generate(OPTIONS))
    assert sum(p.n_ops for p in payloads) == 400
    kinds = Counter(p.kind for p in payloads)
    assert {"single", "batch", "concurrent", "malformed", "duplicate"} <= set(kinds)
    totals = expected_totals(payloads)
    assert totals["stored"] > 0 and totals["rejected"] > 0 and totals["duplicate"] > 0
    stored_ids = [e.op_id for p in payloads for e in p.expected if e.status == "stored"]
    assert len(stored_ids) == len(set(stored_ids))
    for payload in payloads:
        if payload.kind == "concurrent" and payload.concurrent_with is not None:
            (op,) = payload.ops
            partner = next(
                p for p in payloads if p.ops and p.ops[0]["op_id"] == payload.concurrent_with
            )
            (other,) = partner.ops
            assert partner.device_id != payload.device_id
            assert (other["entity_type"], other["entity_id"]) == (
                op["entity_type"],
                op["entity_id"],
            )
            assert set(other["changes"]) == set(op["changes"])
        if payload.kind in ("single", "batch"):
            body = msgspec.json.decode(payload.body)
            ops = body.get("ops", [body])
            for op in ops:
                assert op["edited_at"].endswith("Z")
                assert op["entity_type"] in OPTIONS.entity_types
                if op["operation"] == "update":
                    assert op["changes"]


def test_hot_entities_take_most_edits() -> None:
    opts = GeneratorOptions(entities=1000, hot_share=0.05, seed=5, max_ops=5000)
    touched = Counter(op["entity_id"].split(".")[0] for p in generate(opts) for op in p.ops)
    top50 = sum(n for _, n in touched.most_common(50))
    assert top50 > 0.6 * sum(touched.values())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "::1"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert check_loopback(host, 1883)


@pytest.mark.parametrize("host", ["192.0.2.10", "10.1.2.3", "8.8.8.8", "::ffff:192.0.2.1"])
def test_other_hosts_are_refused(host: str) -> None:
    with pytest.raises(RemoteHostRefused, match="allow-remote"):
        check_loopback(host, 1883)
    assert check_loopback(host, 1883, allow_remote=True)


def test_runner_refuses_a_remote_broker_before_connecting() -> None:
    with pytest.raises(RemoteHostRefused):
        run_simulation(
            Broker(host="192.0.2.10"), OPTIONS, RunOptions(count=1, duration_s=1, progress=False)
        )


def _simulate(daemon: Daemon, *args: str) -> tuple[subprocess.CompletedProcess[bytes], Any]:
    """`python -m gateway simulate` against `daemon`'s broker and topic root."""
    command = [sys.executable, "-m", "gateway", "simulate", "--config", str(daemon.config_path)]
    proc = subprocess.run(
        [*command, *args, "--rate", "0", "--ack-wait", "30", "--json"],
        cwd=ROOT,
        env={**os.environ, **daemon.env},
        capture_output=True,
        timeout=110,
        check=False,
    )
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else None


def test_simulate_command_against_the_daemon(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    daemon = make_daemon(broker.port)
    proc, summary = _simulate(
        daemon,
        *("--devices", "4", "--count", "400", "--duration", "60", "--entities", "50"),
        *("--batch-share", "0.2", "--max-batch", "8", "--conflict-share", "0.2"),
        *("--malformed-share", "0.05", "--duplicate-share", "0.05", "--hot-share", "0.05"),
        *("--seed", "1234"),
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    expected = expected_totals(list(generate(OPTIONS)))
    assert summary["seed"] == 1234
    assert summary["stopped_by"] == "count"
    assert summary["sent"]["ops"] == 400
    assert summary["expected"] == expected
    assert summary["acked"] == expected
    assert summary["unanswered"] == 0

    db = daemon.db_url.split("///", 1)[1]
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("select count(*) from sync_log").fetchone()
        (distinct,) = conn.execute("select count(distinct op_id) from sync_log").fetchone()
        (quarantined,) = conn.execute("select count(*) from quarantine").fetchone()
        devices = {d for (d,) in conn.execute("select distinct device_id from sync_log")}
    assert stored == distinct == expected["stored"]
    assert quarantined == expected["rejected"]
    assert devices == {"sim-1", "sim-2", "sim-3", "sim-4"}
    assert daemon.terminate() == 0


def test_device_metadata_is_accepted(broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> None:
    """Found by the simulator: every op with `device` metadata was a schema error."""
    daemon = make_daemon(broker.port)
    _, summary = _simulate(
        daemon,
        *("--devices", "2", "--count", "20", "--batch-share", "0", "--conflict-share", "0"),
        *("--malformed-share", "0", "--device-meta-share", "1", "--seed", "9"),
    )
    assert summary["acked"] == {"stored": 20, "duplicate": 0, "rejected": 0}


def test_a_bad_op_in_a_batch_is_rejected_alone(
    broker: Mosquitto, make_daemon: Callable[..., Daemon]
) -> None:
    """Found by the simulator: a batch with one schema-invalid op killed the daemon."""
    daemon = make_daemon(broker.port)
    _, summary = _simulate(
        daemon,
        *("--devices", "2", "--count", "200", "--batch-share", "1", "--max-batch", "5"),
        *("--malformed-share", "0.5", "--device-meta-share", "0", "--seed", "11"),
    )
    assert summary["unanswered"] == 0
    assert summary["acked"] == summary["expected"]
    assert daemon.terminate() == 0
