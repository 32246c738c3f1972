"""aiosqlite without its thread hop, for the writer's own thread.

aiosqlite runs every call on a thread of its own and hands the result back
through the event loop: two thread wake-ups per statement, measured on the test
VM at 0.3-0.45 ms for a `SELECT 1`, where a whole commit with its fsync takes
0.2 ms inline. The writer already runs its transactions on a thread and loop of
its own (storage/writer.py), which nothing else uses: there, a statement may as
well run where it is awaited. `InlineConnection` is aiosqlite's connection with
its calls run inline; connecting and closing still go through its thread, as
SQLAlchemy's adapter expects. Only for a connection that one thread uses at a
time (hence `check_same_thread=False`: it is made on aiosqlite's thread).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import aiosqlite


class InlineConnection(aiosqlite.Connection):
    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    @property
    def sqlite(self) -> sqlite3.Connection:
        """The sqlite3 connection itself, for statements run with no adapter between
        (storage/driver.py)."""
        if self._connection is None:
            raise ValueError("Connection closed")
        return self._connection


def inline_connector(database: str) -> Callable[[], Any]:
    """SQLAlchemy's `async_creator` for a file database: an inline connection."""

    async def connect() -> aiosqlite.Connection:
        def open_database() -> sqlite3.Connection:
            return sqlite3.connect(database, check_same_thread=False)

        return await InlineConnection(open_database, 64)

    return connect
