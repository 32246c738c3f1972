"""Answers as a person reads them: tables on a terminal, never walls of JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table

from gateway.cli import conflict_views, dlq_views, ml_views

View = Callable[[dict[str, Any], int], list[RenderableType]]
"""A view takes the answer's data and the terminal's width."""

VIEWS: dict[str, View] = {
    "conflicts/list": conflict_views.conflicts_list,
    "conflicts/get": conflict_views.conflict_get,
    "conflicts/resolve": conflict_views.conflict_resolved,
    "dlq/list": dlq_views.dlq_list,
    "dlq/get": dlq_views.dlq_get,
    "dlq/replay": dlq_views.dlq_replay,
    "dlq/purge": dlq_views.dlq_purge,
    "dlq/reindex": dlq_views.dlq_reindex,
    "webhooks/list": dlq_views.webhooks_list,
    "ml/models": ml_views.list_view,
    "ml/train": ml_views.model_view,
    "ml/activate": ml_views.model_view,
    "ml/status": ml_views.status_view,
}
"""Commands whose answers have a chosen layout; every other answer gets the generic
one (items as a table, the rest as rows). A new view is a row here and a module."""


def show(command: str, answer: dict[str, Any]) -> None:
    """An admin answer: its error in one line, else its view, else the generic layout."""
    console = Console()
    if answer.get("status") != "ok":
        error = answer.get("error") or {}
        path = f" (argument: {error['path']})" if error.get("path") else ""
        console.print(f"[red]error[/red] {error.get('code')}: {error.get('message')}{path}")
        return
    data = answer.get("data") or {}
    view = VIEWS.get(command)
    if view is not None:
        for part in view(data, console.width):
            console.print(part)
        return
    items = data.get("items") if isinstance(data, dict) else None
    if isinstance(items, list):
        console.print(items_table(items))
        if data.get("next_cursor"):
            console.print(f"more: --arg cursor={data['next_cursor']}")
        rest = {k: v for k, v in data.items() if k not in ("items", "next_cursor")}
        if rest:
            console.print(facts("", rest))
        return
    console.print(facts("", data))


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"checks": {"mqtt": {"ok": true}}}` -> `{"checks.mqtt.ok": true}`: one row per fact."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def facts(title: str, data: Any) -> Table:
    table = Table(title=title or None, show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    if isinstance(data, dict):
        for key, value in _flat(data).items():
            table.add_row(key, _cell(value))
    else:
        table.add_row("", _cell(data))
    return table


def items_table(items: list[Any]) -> Table:
    rows = [_flat(item) if isinstance(item, dict) else {"value": item} for item in items]
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    if not items:
        table.caption = "no items"
    return table
