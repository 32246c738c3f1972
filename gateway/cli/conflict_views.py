"""`conflicts/list` and `conflicts/get` as an operator reads them.

A conflict record has seventeen keys and its members carry old and new values
per field; the generic table makes that one column per key. These views choose:
the list is one line per conflict (what, how bad, who, when), the detail is the
conflict's header and its members with the competing values side by side, the
winner of each field starred.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from gateway.cli.cells import Columns, fitted, line_table, more, when

SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "dim"}
STATUS_STYLE = {"open": "bold", "merged": "dim"}
DEVICES_SHOWN = 2
WINNER = "★"

LIST_COLUMNS: Columns = [
    ("id", "left"),
    ("entity", "left"),
    ("severity", "left"),
    ("status", "left"),
    ("fields", "left"),
    ("members", "right"),
    ("devices", "left"),
    ("detected (UTC)", "left"),
]
SHRINKABLE = [(6, 8), (4, 6), (1, 16)]
"""(column, floor): what gives way on a narrow terminal, devices first, the entity last."""


def conflicts_list(data: dict[str, Any], width: int) -> list[RenderableType]:
    """One line per conflict, newest first, within `width` columns: the entity, the
    fields and the devices are cut (with an ellipsis) to fit, in that order of need."""
    items: list[dict[str, Any]] = data.get("items") or []
    rows = [
        [
            item["conflict_id"],
            f"{item['entity_type']}/{item['entity_id']}",
            item["severity"],
            item["status"],
            ", ".join(item["fields"]),
            str(item["member_count"]),
            _few(item["device_ids"]),
            when(item["detected_at"]),
        ]
        for item in items
    ]
    table = line_table(LIST_COLUMNS, fitted(LIST_COLUMNS, rows, width, SHRINKABLE))
    for row in rows:
        conflict_id, entity, severity, status, fields, members, devices, detected = row
        table.add_row(
            conflict_id,
            entity,
            _severity(severity),
            Text(status, style=STATUS_STYLE.get(status, "")),
            fields,
            members,
            devices,
            detected,
        )
    if not items:
        table.caption = "no conflicts"
    return [table, *more(data)]


def conflict_get(data: dict[str, Any], _width: int) -> list[RenderableType]:
    """The conflict's header, then its members: each field's old -> new side by side."""
    conflict = data["conflict"]
    fields: list[str] = conflict["fields"]
    winners: dict[str, str] = conflict["winners"]
    members: list[dict[str, Any]] = conflict["members"]
    return [
        _header(conflict),
        Text(""),
        _members(members, fields, winners),
        *more(data),
    ]


def conflict_resolved(data: dict[str, Any], width: int) -> list[RenderableType]:
    """`conflicts/resolve` answers with the resolved record: shown as `conflicts/get`."""
    return conflict_get({"conflict": data}, width)


def _header(conflict: dict[str, Any]) -> Table:
    header = Table(show_header=False, box=None, pad_edge=False)
    header.add_column(style="bold", no_wrap=True)
    header.add_column()
    status = Text(conflict["status"], style=STATUS_STYLE.get(conflict["status"], ""))
    if conflict["merged_into"]:
        status.append(f" into {conflict['merged_into']}")
    rows: list[tuple[str, str | Text]] = [
        ("conflict", conflict["conflict_id"]),
        ("entity", f"{conflict['entity_type']}/{conflict['entity_id']}"),
        ("status", status),
        ("severity", _severity(conflict["severity"])),
        ("strategy", conflict["strategy"]),
        ("fields", ", ".join(conflict["fields"]) or "-"),
        ("winners", _winners(conflict["winners"], conflict["members"])),
        ("members", _members_count(conflict)),
        ("devices", ", ".join(conflict["device_ids"])),
        ("users", ", ".join(conflict["user_ids"])),
        ("detected", when(conflict["detected_at"], full=True)),
        ("updated", when(conflict["updated_at"], full=True)),
    ]
    if conflict["resolved_at"]:
        by = f" by {conflict['resolved_by']}" if conflict["resolved_by"] else ""
        rows.append(("resolved", f"{when(conflict['resolved_at'], full=True)}{by}"))
    if conflict["note"]:
        rows.append(("note", conflict["note"]))
    for name, value in rows:
        header.add_row(name, value)
    return header


def _members(
    members: Sequence[dict[str, Any]], fields: Sequence[str], winners: dict[str, str]
) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
    table.add_column("op_id", no_wrap=True)
    table.add_column("device", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("edited (UTC)", no_wrap=True)
    for name in fields:
        table.add_column(name, overflow="fold")
    for member in members:
        cells = [_change(member, name, winners.get(name) == member["op_id"]) for name in fields]
        table.add_row(
            member["op_id"],
            member["device_id"],
            member["user_id"],
            str(member["version"]),
            when(member["edited_at"]),
            *cells,
        )
    if winners:
        table.caption = f"{WINNER} the value that wins the field"
    return table


def _change(member: dict[str, Any], name: str, wins: bool) -> Text:
    """`old → new` of one field, `deleted` for a delete, empty where it did not touch it."""
    if member["operation"] == "delete":
        text = Text("deleted", style="italic")
    elif name not in member["changes"]:
        return Text("")
    else:
        change = member["changes"][name]
        text = Text(f"{_value(change.get('old'))} → {_value(change.get('new'))}")
    if wins:
        text.stylize("bold green")
        text.append(f" {WINNER}", style="bold green")
    return text


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _winners(winners: dict[str, str], members: Sequence[dict[str, Any]]) -> str:
    if not winners:
        return "-"
    devices = {m["op_id"]: m["device_id"] for m in members}
    return ", ".join(
        f"{name} ← {op_id}" + (f" ({devices[op_id]})" if op_id in devices else "")
        for name, op_id in sorted(winners.items())
    )


def _members_count(conflict: dict[str, Any]) -> str:
    shown, total = len(conflict["members"]), conflict["member_count"]
    return str(total) if shown == total else f"{total} (the latest {shown} below)"


def _severity(severity: str) -> Text:
    return Text(severity, style=SEVERITY_STYLE.get(severity, ""))


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(names[:DEVICES_SHOWN])
    rest = len(names) - DEVICES_SHOWN
    return f"{shown} +{rest}" if rest > 0 else shown
