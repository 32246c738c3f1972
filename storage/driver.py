"""The writer's hot statements, run on the database driver's own connection.

At a steady load a batch is a handful of operations, and each of its ten-odd
statements cost the writer 70-150 µs in SQLAlchemy (statement caching, parameter
processing, the greenlet hop, result objects) against 1-5 µs in sqlite3 itself:
two thirds of a small commit's CPU (measured at 2,000 ops/s, docs/benchmarks.md).
So the statements that run for every batch are written as SQL with `?`
placeholders, valid in SQLite and PostgreSQL alike, and run here on the
connection of the transaction SQLAlchemy opened: the sqlite3 connection of the
writer's inline aiosqlite (storage/inline_sqlite.py), or psycopg's. Any other
driver goes through `exec_driver_sql`.

The transaction stays SQLAlchemy's: it began it and commits or rolls it back.
A driver's error is raised as SQLAlchemy wraps it (`IntegrityError`, ...), so
that the writer tells a refusal from an outage as it does for every other
statement (storage/refusals.py); parameters never appear in it.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from storage.inline_sqlite import InlineConnection

Row = tuple[Any, ...]


async def fetch(conn: AsyncConnection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """The rows of `sql` (a statement without rows gives none)."""
    driver = _driver(conn)
    try:
        if isinstance(driver, sqlite3.Connection):
            return driver.execute(sql, params).fetchall()
        if conn.dialect.driver == "psycopg":
            async with driver.cursor() as cursor:
                await cursor.execute(_psycopg(sql), params)
                return await cursor.fetchall() if cursor.description else []
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, exc) from exc
    result = await conn.exec_driver_sql(portable(conn, sql), tuple(params))
    return [tuple(row) for row in result] if result.returns_rows else []


async def execute_many(conn: AsyncConnection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """`sql` once for each of `rows` (one round trip on PostgreSQL: psycopg pipelines)."""
    if not rows:
        return
    driver = _driver(conn)
    try:
        if isinstance(driver, sqlite3.Connection):
            driver.executemany(sql, rows)
            return
        if conn.dialect.driver == "psycopg":
            async with driver.cursor() as cursor:
                await cursor.executemany(_psycopg(sql), rows)
            return
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, exc) from exc
    await conn.exec_driver_sql(portable(conn, sql), [tuple(row) for row in rows])


def values(rows: int, columns: int) -> str:
    """`(?, ?), (?, ?)`: the VALUES of a multi-row INSERT (one with RETURNING cannot be
    an executemany)."""
    return _values(rows, columns)


def greatest(conn: AsyncConnection) -> str:
    """The name of the many-argument maximum: PostgreSQL's `greatest`, SQLite's `max`."""
    return "greatest" if conn.dialect.name == "postgresql" else "max"


@functools.lru_cache(maxsize=1024)
def _values(rows: int, columns: int) -> str:
    group = f"({', '.join('?' * columns)})"
    return ", ".join([group] * rows)


def _driver(conn: AsyncConnection) -> Any:
    """The driver's connection under `conn`: the sqlite3 connection of an inline
    aiosqlite one; psycopg's (its dialect says so: psycopg is not imported here, the
    MQTT process of a SQLite gateway never loads it); else the adapter's."""
    sync = conn.sync_connection
    assert sync is not None, "a statement outside a transaction"
    driver = sync.connection.driver_connection
    if isinstance(driver, InlineConnection):
        return driver.sqlite
    return driver


@functools.lru_cache(maxsize=1024)
def _psycopg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def portable(conn: AsyncConnection, sql: str) -> str:
    """`sql`, written with `?` placeholders, in the driver's style (psycopg's `%s`), for
    `exec_driver_sql`."""
    return _psycopg(sql) if conn.dialect.name == "postgresql" else sql


def _wrapped(conn: AsyncConnection, sql: str, exc: Exception) -> DBAPIError:
    """`exc` as SQLAlchemy would have raised it: its class chosen from the driver's."""
    dialect = conn.dialect
    wrapped = DBAPIError.instance(
        sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True, dialect=dialect
    )
    assert isinstance(wrapped, DBAPIError)
    return wrapped
