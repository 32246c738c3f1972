"""storage/schema.py and the Alembic migrations describe the same tables."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from storage import migrate
from storage.schema import metadata


def test_no_difference(db_url: str) -> None:
    migrate.upgrade(db_url)
    sync_url = db_url.replace("+aiosqlite", "")  # psycopg serves both sync and async
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_head_is_the_newest_script() -> None:
    """The start skips Alembic for a database at `migrate.HEAD`: a new migration that
    did not move it would never run at start."""
    assert migrate.head() == migrate.HEAD


async def test_a_database_behind_head_is_upgraded_at_start_and_one_at_head_is_read(
    db_url: str,
) -> None:
    await asyncio.to_thread(migrate.upgrade, db_url, "0009")
    assert await migrate.current(db_url) == "0009"
    await migrate.upgrade_async(db_url)
    assert await migrate.current(db_url) == migrate.HEAD
    await migrate.upgrade_async(db_url)
    assert await migrate.current(db_url) == migrate.HEAD
