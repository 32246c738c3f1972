"""`fieldgate admin` and `fieldgate status` as an operator runs them: subprocesses.

Each test runs `python -m gateway ...` with a TOML config file (or environment
overrides) pointing at the test broker and at a running daemon's topic root,
and checks the exit code and what is printed: JSON when piped or with
--json-output, tables on a terminal (a pseudo-terminal from util-linux `script`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from tests.support import (
    ROOT,
    Client,
    Daemon,
    Mosquitto,
    free_port,
    in_a_terminal,
    require,
    send_one,
    stored,
    sync_op,
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FIELDGATE_ setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


def write_config(path: Path, port: int, root: str, extra: str = "") -> Path:
    path.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\ntopic_root = "{root}"\n{extra}')
    return path


def fieldgate(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON line of a successful `admin --json-output` run."""
    assert result.returncode == 0, result
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    answer: dict[str, Any] = json.loads(lines[0])
    assert set(answer) == {"transaction", "status", "data"}
    assert answer["status"] == "ok"
    assert re.fullmatch(r"[0-9a-f]{24}", answer["transaction"]), answer
    return answer


def publish_ops(client: Client, root: str, device: str, ops: list[dict[str, Any]]) -> None:
    """Publish `ops` (on fresh entities) one by one, each after the previous one's ack."""
    client.subscribe(f"{root}/devices/{device}/sync/ack")
    versions: Counter[str] = Counter()
    for op in ops:
        versions[op["entity_id"]] += 1
        assert send_one(client, root, device, op) == stored(op["op_id"], versions[op["entity_id"]])


@pytest.fixture
def daemon(broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(broker.port)


@pytest.fixture
def config(tmp_path: Path, broker: Mosquitto, daemon: Daemon) -> Path:
    """A config file for the CLI: the test broker, the daemon's topic root."""
    return write_config(tmp_path / "cli.toml", broker.port, daemon.root)


def test_admin_health(config: Path, healthy: dict[str, Any]) -> None:
    answer = ok_json(fieldgate("admin", "health", "--json-output", "--config", config))
    assert answer["data"] == healthy


def test_admin_by_environment_alone(broker: Mosquitto, daemon: Daemon, tmp_path: Path) -> None:
    env = clean_env(FIELDGATE_MQTT__PORT=str(broker.port), FIELDGATE_MQTT__TOPIC_ROOT=daemon.root)
    # no config file in this directory: defaults, then the environment
    answer = ok_json(fieldgate("admin", "info", "--json-output", env=env, cwd=tmp_path))
    assert answer["data"] == {
        "version": __version__,
        "instance": daemon.env["FIELDGATE_INSTANCE"],
        "started_at": answer["data"]["started_at"],
        "config_path": str(daemon.config_path),
        "topic_root": daemon.root,
        "database": daemon.db_url,
        "shared_group": None,
    }


def test_admin_stats_and_history_show_what_the_daemon_holds(
    config: Path, daemon: Daemon, client: Client
) -> None:
    publish_ops(
        client,
        daemon.root,
        "d1",
        [
            sync_op("op-1", operation="create", changes={"status": {"old": None, "new": "open"}}),
            sync_op("op-2"),
            sync_op("op-3", entity_id="t2"),
        ],
    )
    stats = ok_json(fieldgate("admin", "stats", "--json-output", "--config", config))["data"]
    assert stats["ops"] == {"stored": 3, "duplicate": 0, "rejected": 0}
    assert stats["messages"] == {"alert": 0, "crisis_ack": 0, "sync": 3, "admin": 1}
    assert stats["rejected_by_code"] == {}

    history = ok_json(
        fieldgate(
            "admin",
            "sync/history",
            "--arg",
            "entity_type=task",
            "--arg",
            "entity_id=t1",
            "--json-output",
            "--config",
            config,
        )
    )["data"]
    for item in history["items"]:
        assert item.pop("received_at").endswith("Z")
    assert history == {
        "entity_type": "task",
        "entity_id": "t1",
        "items": [
            {
                "op_id": "op-2",
                "version": 2,
                "device_id": "d1",
                "user_id": "u1",
                "operation": "update",
                "changes": {"status": {"old": "open", "new": "done"}},
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "base_version": None,
                "batch_id": None,
            },
            {
                "op_id": "op-1",
                "version": 1,
                "device_id": "d1",
                "user_id": "u1",
                "operation": "create",
                "changes": {"status": {"old": None, "new": "open"}},
                "edited_at": "2026-11-29T12:00:00.000000Z",
                "base_version": None,
                "batch_id": None,
            },
        ],
    }
    # --json gives typed arguments; --arg strings are coerced by the daemon
    limited = ok_json(
        fieldgate(
            "admin",
            "sync/history",
            "--json",
            '{"entity_type": "task", "entity_id": "t1", "limit": 1}',
            "--json-output",
            "--config",
            config,
        )
    )["data"]
    assert [(i["op_id"], i["version"]) for i in limited["items"]] == [("op-2", 2)]
    coerced = ok_json(
        fieldgate(
            "admin",
            "sync/history",
            "-a",
            "entity_type=task",
            "-a",
            "entity_id=t2",
            "-a",
            "limit=5",
            "--json-output",
            "--config",
            config,
        )
    )["data"]
    assert [(i["op_id"], i["version"]) for i in coerced["items"]] == [("op-3", 1)]


def test_error_answers_exit_1(config: Path) -> None:
    result = fieldgate("admin", "no/such", "--json-output", "--config", config)
    assert result.returncode == 1, result
    answer = json.loads(result.stdout)
    assert answer == {
        "transaction": answer["transaction"],
        "status": "error",
        "error": {"code": "unknown_command", "message": "no command 'no/such'"},
    }
    result = fieldgate(
        "admin", "quarantine/list", "--arg", "limit=lots", "--json-output", "--config", config
    )
    assert result.returncode == 1, result
    assert json.loads(result.stdout)["error"] == {
        "code": "invalid_args",
        "message": "Expected `int`, got `str`",
        "path": "limit",
    }


def test_a_key_repeated_gives_a_list_and_one_given_for_a_list_gets_a_hint(config: Path) -> None:
    """`dlq/get` takes `ids`, a list: two `--arg ids=` make one; a single one is the
    daemon's typed error, and the CLI says what to type instead."""
    answer = ok_json(
        fieldgate(
            "admin",
            "dlq/get",
            "-a",
            "ids=dlq_a",
            "-a",
            "ids=dlq_b",
            "--json-output",
            "--config",
            config,
        )
    )
    assert answer["data"]["missing"] == ["dlq_a", "dlq_b"]
    result = fieldgate("admin", "dlq/get", "-a", "ids=dlq_a", "--json-output", "--config", config)
    assert result.returncode == 1, result
    assert json.loads(result.stdout)["error"]["path"] == "ids"
    assert result.stderr.splitlines() == [
        "hint: ids takes a list: repeat the key (--arg ids=dlq_a --arg ids=...)"
        """ or give it as JSON (--json '{"ids": ["dlq_a"]}')"""
    ]


def test_token_from_the_config_file(
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
    healthy: dict[str, Any],
) -> None:
    daemon = make_daemon(broker.port, ADMIN__TOKEN="cli-s3cret")
    good = write_config(
        tmp_path / "good.toml", broker.port, daemon.root, '\n[admin]\ntoken = "cli-s3cret"\n'
    )
    assert ok_json(fieldgate("admin", "health", "--json-output", "--config", good))["data"] == (
        healthy
    )
    none = write_config(tmp_path / "none.toml", broker.port, daemon.root)
    result = fieldgate("admin", "health", "--json-output", "--config", none)
    assert result.returncode == 1, result
    assert json.loads(result.stdout)["error"] == {
        "code": "unauthorized",
        "message": "a valid admin token is required",
    }


def test_no_daemon_exits_3(broker: Mosquitto, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nobody.toml", broker.port, "fg-nobody-home")
    result = fieldgate("admin", "health", "--timeout", "1", "--config", config)
    assert result.returncode == 3, result
    assert result.stdout == ""
    assert result.stderr == "fieldgate: health: no answer within 1 s (is the daemon running?)\n"


def test_no_broker_exits_3(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "nobroker.toml", port, "fg-nobroker")
    result = fieldgate("admin", "health", "--timeout", "1", "--config", config)
    assert result.returncode == 3, result
    assert result.stderr.startswith(f"fieldgate: cannot reach the broker at 127.0.0.1:{port}: ")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            '[mqtt]\nport = "many"\n',
            "mqtt.port: Input should be a valid integer, unable to parse string as an integer",
        ),
        ("[mqtt]\nprot = 1883\n", "mqtt.prot: unknown key"),
        ("[mqtt\nport = 1\n", "not valid TOML: "),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, text: str, reason: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for args in (["admin", "health"], ["status"]):
        result = fieldgate(*args, "--config", config)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.startswith(f"fieldgate: config {config}: {reason}")
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    missing = tmp_path / "missing.toml"
    result = fieldgate("admin", "health", "--config", missing)
    assert result.returncode == 2
    assert result.stderr == f"fieldgate: config {missing}: no such file\n"


def test_status_shows_online(config: Path, daemon: Daemon) -> None:
    result = fieldgate("status", "--json-output", "--config", config)
    assert result.returncode == 0, result
    found = json.loads(result.stdout)
    assert set(found) == {"status", "health", "source"}
    assert found["status"] == {
        "state": "online",
        "version": __version__,
        "instance": daemon.env["FIELDGATE_INSTANCE"],
        "started_at": found["status"]["started_at"],
    }
    assert found["source"] == "daemon"
    assert found["health"]["healthy"] is True
    assert found["health"]["ops"] == {"stored": 0, "duplicate": 0, "rejected": 0}

    daemon.terminate()
    result = fieldgate("status", "--json-output", "--config", config)
    assert result.returncode == 1, result
    found = json.loads(result.stdout)
    assert (found["status"]["state"], found["source"]) == ("offline", "retained")


def test_status_shows_the_figures_of_now_not_the_start_up_report(
    config: Path, daemon: Daemon, client: Client
) -> None:
    """Right after start the retained report says 0 stored until the next interval
    (60 s); `status` asks the daemon, so a newcomer sees what just happened.

    Checked against: `status` showing the retained report when the daemon answers
    (stored would be 0, source `retained`)."""
    publish_ops(client, daemon.root, "d1", [sync_op("now-1"), sync_op("now-2")])
    result = fieldgate("status", "--json-output", "--config", config)
    assert result.returncode == 0, result
    found = json.loads(result.stdout)
    assert found["source"] == "daemon"
    assert found["health"]["ops"] == {"stored": 2, "duplicate": 0, "rejected": 0}
    assert found["health"]["healthy"] is True


def test_status_falls_back_to_the_retained_report_when_the_daemon_does_not_answer(
    config: Path, daemon: Daemon, client: Client
) -> None:
    """A daemon that is online but does not answer (stopped with SIGSTOP: hung) is shown
    by its last retained report, and `source` says so.

    The first report is published just after `ready`: the daemon is stopped once it
    is retained (stopped before, there is no report to show, and the run failed so).

    Checked against: `status` waiting for the answer forever, and `status` showing
    no health at all when the daemon does not answer."""
    client.subscribe(f"{daemon.root}/health")
    (report,) = client.expect(1)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        result = fieldgate("status", "--json-output", "--config", config)
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    assert result.returncode == 0, result
    found = json.loads(result.stdout)
    assert (found["status"]["state"], found["source"]) == ("online", "retained")
    assert found["health"] == report.json()


def test_tables_on_a_terminal(config: Path, daemon: Daemon, client: Client) -> None:
    require("script")
    publish_ops(client, daemon.root, "d1", [sync_op("op-1")])

    code, lines = in_a_terminal(["admin", "health", "--config", config])
    assert code == 0, lines
    rows = [line.split() for line in lines]
    assert ["healthy", "True"] in rows
    assert ["checks.mqtt.ok", "True"] in rows
    assert ["checks.database.ok", "True"] in rows
    assert ["checks.model.detail", "no", "model", "active"] in rows
    assert not any(line.lstrip().startswith("{") for line in lines)  # a table, not JSON

    code, lines = in_a_terminal(
        ["admin", "sync/history", "-a", "entity_type=task", "-a", "entity_id=t1", "-c", config]
    )
    assert code == 0, lines
    header = next(line for line in lines if "op_id" in line)
    assert [cell.strip() for cell in header.split("┃")[1:6]] == [
        "op_id",
        "version",
        "device_id",
        "user_id",
        "operation",
    ]
    (row,) = [line for line in lines if line.startswith("│ op-1 ")]
    assert [cell.strip() for cell in row.split("│")[1:8]] == [
        "op-1",
        "1",
        "d1",
        "u1",
        "update",
        "open",
        "done",
    ]
    assert lines[-2:] == [" entity_type  task", " entity_id    t1"]

    code, lines = in_a_terminal(["admin", "no/such", "--config", config])
    assert code == 1
    assert lines == ["error unknown_command: no command 'no/such'"]

    code, lines = in_a_terminal(["status", "--config", config])
    assert code == 0, lines
    rows = [line.split() for line in lines]
    assert ["state", "online"] in rows
    assert ["instance", daemon.env["FIELDGATE_INSTANCE"]] in rows


def test_status_when_no_daemon_ever_ran(broker: Mosquitto, tmp_path: Path) -> None:
    config = write_config(tmp_path / "never.toml", broker.port, "fg-never-ran")
    result = fieldgate("status", "--json-output", "--config", config)
    assert result.returncode == 1, result
    assert json.loads(result.stdout) == {}
    assert result.stderr == ""
