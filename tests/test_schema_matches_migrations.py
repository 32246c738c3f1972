"""storage/schema.py and the Alembic migrations describe the same tables."""

from __future__ import annotations

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
