"""Schema migrations, callable from the CLI and from `run` at start.

Alembic is imported where a migration runs, not with this module: the daemon
imports it to check the revision at start, and a database already at `HEAD` (the
common start) is read with one query. Alembic's import and its look at the
scripts took 0.15 s of a start that a crisis queued behind a backlog waits
through (benchmarks/backlog_priority.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from storage.db import create_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"

HEAD = "0013"
"""The newest revision of storage/migrations/versions (tests/test_schema_matches_migrations.py
holds the two together)."""


def _config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database to `revision`; blocking, so call it off the event loop."""
    from alembic import command

    command.upgrade(_config(url), revision)


def head() -> str | None:
    """The newest revision, as the scripts say."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config("sqlite://")).get_current_head()


async def current(url: str) -> str | None:
    """The revision the database is at, or None for an empty database."""

    def read(connection: Connection) -> str | None:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("select version_num from alembic_version")).scalar()

    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(read)
    finally:
        await engine.dispose()


async def upgrade_async(url: str, revision: str = "head") -> None:
    if revision == "head" and await current(url) == HEAD:
        return
    await asyncio.to_thread(upgrade, url, revision)
