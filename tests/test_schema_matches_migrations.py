"""storage/schema.py and the Alembic migrations describe the same tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from storage import migrate
from storage.schema import metadata


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/schema.db"
    return str(request.getfixturevalue("pg_url"))


def test_no_difference(url: str) -> None:
    migrate.upgrade(url)
    sync_url = url.replace("+aiosqlite", "")  # psycopg serves both sync and async
    engine = create_engine(sync_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()
