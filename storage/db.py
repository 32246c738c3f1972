"""The engine: SQLite tuned for durable group commit, or PostgreSQL by URL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

from sqlalchemy import Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from storage import driver
from storage.inline_sqlite import inline_connector

CHUNK = 900
"""Rows per IN list: under SQLite's and PostgreSQL's bound-parameter limits."""


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def by_entity(keys: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """How to select `keys` ((entity_type, entity_id) pairs) with driver SQL that ends
    `entity_type = ? AND entity_id IN ({keys})`: per entity type and chunk, the IN
    list's placeholders and the parameters (the type, then the ids). Both databases
    answer that from the (entity_type, entity_id) index. (SQLite answers a row-value
    IN, what `tuple_(...).in_()` renders, by scanning the whole table: measured, at 10
    million rows of log, the cost of a batch.)"""
    for kind, names in per_type(keys):
        for part in chunks(names):
            yield marks(part), [kind, *part]


def per_type(keys: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(entity_type, its entity ids in the order `keys` gives them) per type of
    `keys` ((entity_type, entity_id) pairs), types sorted: what a query by entity
    asks of each type's index."""
    grouped: dict[str, list[str]] = {}
    for kind, name in keys:
        grouped.setdefault(kind, []).append(name)
    return sorted(grouped.items())


def marks(values: Sized) -> str:
    """`?, ?, ?`: a placeholder for each value of an IN list (driver SQL)."""
    return ", ".join("?" * len(values))


def upsert_into(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into `table` that takes ON CONFLICT: SQLite and PostgreSQL spell the
    clause alike, but each dialect has its own construct for it."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


async def driver_rows(
    conn: AsyncConnection, sql: str, params: Sequence[Any], columns: Sequence[str]
) -> list[dict[str, Any]]:
    """Rows of `sql` (written with `?` placeholders, for SQLite and PostgreSQL alike) as
    dicts keyed by `columns`, run on the driver itself (storage/driver.py).

    For the detector's statements whose shape changes with every batch (a UNION ALL
    of one part per entity): compiling such a statement costs more than running it,
    and no compiled form is ever reused.
    """
    return [dict(zip(columns, row, strict=True)) for row in await driver.fetch(conn, sql, params)]


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(
    url: str,
    *,
    echo: bool = False,
    pool_size: int = 5,
    inline: bool = False,
    autocommit: bool = False,
) -> AsyncEngine:
    """An async engine; for SQLite, WAL with `synchronous=FULL`.

    An ack promises the operation survives a power cut, so each commit must reach
    the disk: FULL fsyncs the WAL on every commit, and group commit makes that one
    fsync per batch. `busy_timeout` lets the CLI read while the daemon writes.
    `inline`: SQLite's statements run on the awaiting thread, for a thread that
    does nothing else (the writer's: storage/inline_sqlite.py). `autocommit`: each
    statement commits by itself, set once per connection (see `autocommit_twin`).
    """
    parsed = make_url(url)
    # Bound parameters never appear in exception messages or echo logs: an alert's
    # note is a parameter, and a traceback in the log must not carry it.
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if autocommit:
        kwargs["isolation_level"] = "AUTOCOMMIT"
    if is_sqlite(parsed):
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if inline and database and database != ":memory:":
            kwargs["async_creator"] = inline_connector(database)
        engine = create_async_engine(parsed, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.update(pool_size=pool_size, pool_pre_ping=True)
    return create_async_engine(parsed, **kwargs)


def autocommit_twin(engine: AsyncEngine) -> AsyncEngine:
    """An engine on `engine`'s database whose connections commit each statement by
    themselves. `execution_options(isolation_level="AUTOCOMMIT")` on a connection of
    `engine` switches the level at each checkout and back at each checkin: with
    aiosqlite, two round trips to its thread, which were a seventh of the webhook
    sender's work on the MQTT process's loop (docs/benchmarks.md). Its own small
    pool; dispose of it with `engine`."""
    return create_engine(
        engine.url.render_as_string(hide_password=False), pool_size=2, autocommit=True
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


async def encoding_problem(engine: AsyncEngine) -> str | None:
    """Why this database cannot hold what devices send, in one line; None if it can.

    Ids, field names and notes are Unicode. A PostgreSQL database in another
    encoding (LATIN1, SQL_ASCII: old clusters initialised under such a locale)
    refuses any character it lacks, so valid operations would be rejected one
    by one as refused data: better not to start.
    """
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        encoding = (await conn.execute(text("SHOW server_encoding"))).scalar_one()
    if encoding == "UTF8":
        return None
    return (
        f"database.url: the database's encoding is {encoding}, and fieldgate needs UTF8"
        " (CREATE DATABASE ... ENCODING 'UTF8')"
    )
