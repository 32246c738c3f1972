"""`dlq/*` and `webhooks/list` as an operator reads them.

A dead-letter entry carries its whole payload and eleven fields; the generic
table would make each one a column and fold the payload into a wall. The list
is one line per entry (which endpoint, what event, how often and why it failed,
when), cut to the terminal's width; the detail gives one entry's facts and its
payload pretty-printed; a replay is its summary and the failures to look at.
`--json-output` keeps the raw answer, whole ids included, for scripts.
"""

from __future__ import annotations

import json
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from gateway.cli.cells import Columns, fitted, line_table, more, when

LIST_COLUMNS: Columns = [
    ("id", "left"),
    ("webhook", "left"),
    ("event", "left"),
    ("attempts", "right"),
    ("last status / error", "left"),
    ("failed (UTC)", "left"),
]
LIST_SHRINKABLE = [(0, 13), (4, 12), (1, 8), (2, 10)]
"""(column, floor): what gives way on a narrow terminal: the id first (down to `dlq_` and
8 hex digits, distinct enough to tell entries apart), then the error, the event last."""

WEBHOOK_COLUMNS: Columns = [
    ("name", "left"),
    ("state", "left"),
    ("in flight", "right"),
    ("pending", "right"),
    ("retrying", "right"),
    ("last success", "left"),
    ("last error", "left"),
]
WEBHOOK_SHRINKABLE = [(6, 16), (0, 12), (1, 6)]
STATE_STYLE = {
    "active": "green",
    "yielding": "cyan",
    "paused": "bold yellow",
    "probing": "yellow",
    "disabled": "dim",
}


def dlq_list(data: dict[str, Any], width: int) -> list[RenderableType]:
    """One line per entry, newest first, within `width` columns: whole ids from about
    130 columns on, cut below (they are 37 characters)."""
    items: list[dict[str, Any]] = data.get("items") or []
    rows = [
        [
            item["id"],
            item["webhook"],
            item["event_type"],
            str(item["attempts"]),
            _last(item),
            when(item["failed_at"]),
        ]
        for item in items
    ]
    sizes = fitted(LIST_COLUMNS, rows, width, LIST_SHRINKABLE)
    table = line_table(LIST_COLUMNS, sizes)
    for row in rows:
        table.add_row(*row)
    if not items:
        table.caption = "the dead-letter queue is empty"
    cut = any(len(row[0]) > sizes[0] for row in rows)
    notes = [Text("ids cut to fit: a wider terminal or --json-output shows them whole")]
    return [table, *more(data), *(notes if cut else [])]


def dlq_get(data: dict[str, Any], _width: int) -> list[RenderableType]:
    """Each entry's facts, then its payload as sent, indented; the ids not found."""
    parts: list[RenderableType] = []
    for item in data.get("items") or []:
        if parts:
            parts.append(Text(""))
        parts.append(_entry(item))
        parts.append(Text("payload", style="bold"))
        parts.append(Text(json.dumps(item["payload"], indent=2, ensure_ascii=False)))
    missing: list[str] = data.get("missing") or []
    if missing:
        parts.append(Text(f"not in the dead-letter queue: {', '.join(missing)}"))
    return parts


def dlq_replay(data: dict[str, Any], _width: int) -> list[RenderableType]:
    """`replayed 975 of 1000, 25 failed`, then the failures the answer names."""
    total, replayed, failed = data["total"], data["replayed"], data["failed"]
    summary = Text(f"replayed {replayed} of {_entries(total)}")
    if failed:
        summary.append(f", {failed} failed", style="bold red")
    failures: list[dict[str, str]] = data.get("failures") or []
    if not failures:
        return [summary]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True)
    table.add_column("error", overflow="fold")
    for failure in failures:
        table.add_row(failure["id"], failure["error"])
    if failed > len(failures):
        table.caption = f"the first {len(failures)} of {failed} failures"
    return [summary, table]


def dlq_purge(data: dict[str, Any], _width: int) -> list[RenderableType]:
    return [Text(f"purged {_entries(data['purged'])}")]


def dlq_reindex(data: dict[str, Any], _width: int) -> list[RenderableType]:
    return [Text(f"adopted {_entries(data['adopted'])} into the index")]


def webhooks_list(data: dict[str, Any], width: int) -> list[RenderableType]:
    """One line per endpoint: whether it is sending, what waits, how it last went."""
    items: list[dict[str, Any]] = data.get("items") or []
    rows = [
        [
            item["name"],
            _state(item),
            str(item["in_flight"]),
            str(item["pending"]),
            str(item["retrying"]),
            when(item["last_success_at"]),
            _last_error(item),
        ]
        for item in items
    ]
    table = line_table(WEBHOOK_COLUMNS, fitted(WEBHOOK_COLUMNS, rows, width, WEBHOOK_SHRINKABLE))
    for item, row in zip(items, rows, strict=True):
        state = Text(row[1], style=STATE_STYLE.get(item["state"], ""))
        table.add_row(row[0], state, *row[2:])
    if not items:
        table.caption = "no endpoints configured"
    return [table]


def _entry(item: dict[str, Any]) -> Table:
    facts = Table(show_header=False, box=None, pad_edge=False)
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column()
    rows = [
        ("entry", item["id"]),
        ("webhook", item["webhook"]),
        ("url", item["url"]),
        ("event", item["event_type"]),
        ("attempts", str(item["attempts"])),
        ("first attempt", when(item["first_attempt_at"], full=True)),
        ("failed", when(item["failed_at"], full=True)),
        ("last status", "-" if item["last_status"] is None else str(item["last_status"])),
        ("last error", item["last_error"] or "-"),
        ("webhook-id", item.get("webhook_id") or "- (a replay makes one)"),
    ]
    for name, value in rows:
        facts.add_row(name, value)
    return facts


def _last(item: dict[str, Any]) -> str:
    """The last error, which names the status when there was one (`HTTP 503`); the
    status alone if a producer wrote no error."""
    if item.get("last_error"):
        return str(item["last_error"])
    if item.get("last_status") is not None:
        return f"HTTP {item['last_status']}"
    return "-"


def _state(item: dict[str, Any]) -> str:
    """The state, and until when a paused endpoint waits before its probe."""
    paused_until = (item.get("breaker") or {}).get("paused_until")
    if item["state"] == "paused" and paused_until:
        return f"paused till {when(paused_until)[6:]}"
    return str(item["state"])


def _last_error(item: dict[str, Any]) -> str:
    """The error first (what a cut column keeps), then when."""
    if not item.get("last_error"):
        return "-"
    return f"{item['last_error']} ({when(item.get('last_error_at'))})"


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"
