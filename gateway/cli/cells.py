"""What every chosen view writes alike: one-line tables cut to the terminal, times in a
column, the line to the next page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

Columns = Sequence[tuple[str, JustifyMethod]]
"""A table's columns: each one's heading and how its cells are justified."""


def fitted(
    columns: Columns,
    rows: Sequence[Sequence[str]],
    width: int,
    shrinkable: Sequence[tuple[int, int]],
) -> list[int]:
    """Each column as wide as its widest cell; when that does not fit in `width`, the
    `shrinkable` ones, (index, floor), give way down to their floors, in their order."""
    sizes = [
        max([len(name), *(len(row[i]) for row in rows)]) for i, (name, _) in enumerate(columns)
    ]
    excess = sum(sizes) + 2 * (len(sizes) - 1) - width
    for index, floor in shrinkable:
        if excess <= 0:
            break
        give = min(excess, max(0, sizes[index] - floor))
        sizes[index] -= give
        excess -= give
    return sizes


def line_table(columns: Columns, widths: Sequence[int]) -> Table:
    """A table of one line per row: cells cut with an ellipsis at their column's width,
    never wrapped (a list read down its rows stays one row per thing)."""
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        header_style="bold",
    )
    for (name, justify), size in zip(columns, widths, strict=True):
        table.add_column(name, justify=justify, width=size, no_wrap=True, overflow="ellipsis")
    return table


def when(stamp: str | None, *, full: bool = False) -> str:
    """`2026-12-05T23:40:12.345678Z` -> `12-05 23:40:12` (or the whole stamp): a table's
    column of times stays narrow, and UTC, as the answers are."""
    if not stamp:
        return "-"
    if full:
        return stamp
    return f"{stamp[5:10]} {stamp[11:19]}"


def more(data: dict[str, Any]) -> list[RenderableType]:
    """`more: --arg cursor=...` when there is a next page: what to type for it."""
    cursor = data.get("next_cursor")
    return [Text(f"more: --arg cursor={cursor}")] if cursor else []
