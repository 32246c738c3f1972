"""`fieldgate admin conflicts/list` and `conflicts/get` on a terminal, as an operator reads them.

Three devices edit one work order's status within the window (one conflict of
three members); two edit a task's long-named title (a second one). The list is
one line per conflict with the chosen columns, within 100 columns on a
100-column terminal; the detail is the header and the members with their
competing values side by side, the winner starred; --json-output is the raw answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Client, Daemon, Mosquitto, in_a_terminal, require, sync_op, wait_for

LONG_TASK = "task-replace-the-hvac-filter-in-building-seven"


@pytest.fixture(autouse=True)
def terminal() -> None:
    require("script")


def cells(line: str) -> list[str]:
    """A table line's cells: columns are two or more spaces apart."""
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture
def daemon(broker: Mosquitto, make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon(broker.port)


@pytest.fixture
def config(tmp_path: Path, broker: Mosquitto, daemon: Daemon) -> str:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntopic_root = "{daemon.root}"\n'
    )
    return str(path)


def publish(client: Client, root: str, device: str, op: dict[str, Any]) -> None:
    """One op, waited for until its ack says stored."""
    ack = f"{root}/devices/{device}/sync/ack"
    client.subscribe(ack)
    client.publish(f"{root}/devices/{device}/sync", op)

    def stored() -> bool:
        return any(
            r["op_id"] == op["op_id"] and r["status"] == "stored"
            for m in list(client.all)
            if m.topic == ack
            for r in m.json()["results"]
        )

    wait_for(stored)


def status(op_id: str, user: str, new: str, at: str) -> dict[str, Any]:
    return sync_op(
        op_id,
        entity_type="work_order",
        entity_id="wo-17",
        user_id=user,
        changes={"status": {"old": "open", "new": new}},
        edited_at=at,
    )


def title(op_id: str, user: str, new: str, at: str) -> dict[str, Any]:
    return sync_op(
        op_id,
        entity_id=LONG_TASK,
        user_id=user,
        changes={"title": {"old": "Filter", "new": new}},
        edited_at=at,
    )


@pytest.fixture
def conflicts(config: str, daemon: Daemon, client: Client) -> list[dict[str, Any]]:
    """The two conflicts as `conflicts/list --json-output` gives them, newest first."""
    publish(
        client,
        daemon.root,
        "tablet-a",
        status("op-1", "amira", "in_progress", "2026-11-29T12:00:00Z"),
    )
    publish(client, daemon.root, "phone-b", status("op-2", "ben", "done", "2026-11-29T12:00:10Z"))
    publish(
        client, daemon.root, "phone-c", status("op-3", "chen", "blocked", "2026-11-29T12:00:20Z")
    )
    publish(
        client,
        daemon.root,
        "tablet-a",
        title("op-4", "amira", "Replace filter", "2026-11-29T12:01:00Z"),
    )
    publish(
        client,
        daemon.root,
        "phone-b",
        title("op-5", "ben", "Replace HVAC filter", "2026-11-29T12:01:30Z"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "admin", "conflicts/list", "--json-output", "-c", config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    items: list[dict[str, Any]] = json.loads(result.stdout)["data"]["items"]
    assert [(c["entity_id"], c["member_count"]) for c in items] == [(LONG_TASK, 2), ("wo-17", 3)]
    return items


def test_the_list_is_one_line_per_conflict_within_100_columns(
    config: str, conflicts: list[dict[str, Any]]
) -> None:
    task, order = conflicts
    code, lines = in_a_terminal(["admin", "conflicts/list", "-c", config], columns=100)
    assert code == 0, lines
    assert max(len(line) for line in lines) <= 100, lines
    assert cells(lines[0]) == [
        "id",
        "entity",
        "severity",
        "status",
        "fields",
        "members",
        "devices",
        "detected (UTC)",
    ]
    assert set(lines[1].strip()) == {"─"}
    rows = [cells(line) for line in lines[2:]]
    assert len(rows) == 2, lines
    assert rows[1] == [
        order["conflict_id"],
        "work_order/wo-17",
        order["severity"],
        "auto_resolved",
        "status",
        "3",
        "phone-b…",
        order["detected_at"][5:10] + " " + order["detected_at"][11:19],
    ]
    # to fit, the devices give way first (to 8), then the entity (down to 16)
    assert rows[0] == [
        task["conflict_id"],
        "task/task-replac…",
        task["severity"],
        "auto_resolved",
        "title",
        "2",
        "phone-b…",
        task["detected_at"][5:10] + " " + task["detected_at"][11:19],
    ]

    code, lines = in_a_terminal(["admin", "conflicts/list", "-c", config], columns=160)
    assert code == 0, lines
    assert [cells(line)[1] for line in lines[2:]] == [f"task/{LONG_TASK}", "work_order/wo-17"]
    assert [cells(line)[6] for line in lines[2:]] == ["phone-b, tablet-a", "phone-b, phone-c +1"]


def test_get_shows_the_header_and_the_competing_values_side_by_side(
    config: str, conflicts: list[dict[str, Any]]
) -> None:
    order = conflicts[1]
    args = ["admin", "conflicts/get", "-a", f"conflict_id={order['conflict_id']}", "-c", config]
    code, lines = in_a_terminal(args, columns=120)
    assert code == 0, lines
    header = dict(line.split(None, 1) for line in lines[:12])
    assert header == {
        "conflict": order["conflict_id"],
        "entity": "work_order/wo-17",
        "status": "auto_resolved",
        "severity": order["severity"],
        "strategy": "last_writer_wins",
        "fields": "status",
        "winners": "status ← op-3 (phone-c)",
        "members": "3",
        "devices": "phone-b, phone-c, tablet-a",
        "users": "amira, ben, chen",
        "detected": order["detected_at"],
        "updated": order["updated_at"],
    }
    assert cells(lines[12]) == ["op_id", "device", "user", "version", "edited (UTC)", "status"]
    assert [cells(line) for line in lines[14:17]] == [
        ["op-3", "phone-c", "chen", "3", "11-29 12:00:20", '"open" → "blocked" ★'],
        ["op-2", "phone-b", "ben", "2", "11-29 12:00:10", '"open" → "done"'],
        ["op-1", "tablet-a", "amira", "1", "11-29 12:00:00", '"open" → "in_progress"'],
    ]
    assert lines[17].strip() == "★ the value that wins the field"
    assert len(lines) == 18, lines

    code, lines = in_a_terminal([*args, "-a", "limit=2"], columns=120)
    assert code == 0, lines
    assert dict(line.split(None, 1) for line in lines[:12])["members"] == "3 (the latest 2 below)"
    assert [cells(line)[0] for line in lines[14:16]] == ["op-3", "op-2"]
    assert re.fullmatch(r"more: --arg cursor=\S+", lines[-1]), lines


def test_json_output_on_a_terminal_is_the_raw_answer(
    config: str, conflicts: list[dict[str, Any]]
) -> None:
    code, lines = in_a_terminal(
        ["admin", "conflicts/list", "--json-output", "-c", config], columns=100
    )
    assert code == 0, lines
    answer = json.loads("\n".join(lines))
    assert answer["status"] == "ok"
    assert answer["data"]["items"] == conflicts


def test_resolve_answers_with_the_resolved_conflict_as_get_shows_it(
    config: str, conflicts: list[dict[str, Any]]
) -> None:
    order = conflicts[1]
    args = ["admin", "conflicts/resolve", "-a", f"conflict_id={order['conflict_id']}"]
    code, lines = in_a_terminal(
        [*args, "-a", "winner_op_id=op-1", "-a", "by=anna", "-c", config], columns=120
    )
    assert code == 0, lines
    header = dict(line.split(None, 1) for line in lines[:13])
    assert (header["status"], header["winners"]) == ("resolved", "status ← op-1 (tablet-a)")
    assert header["resolved"].endswith(" by anna")
    assert [cells(line)[-1] for line in lines[15:18]] == [
        '"open" → "blocked"',
        '"open" → "done"',
        '"open" → "in_progress" ★',
    ]

    code, lines = in_a_terminal(
        [*args, "-a", "winner_op_id=op-4", "-a", "by=anna", "-c", config], columns=120
    )
    assert code == 1
    assert lines == [
        f"error invalid_args: conflict {order['conflict_id']} is resolved already"
        " (argument: conflict_id)"
    ]
