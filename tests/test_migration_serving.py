"""Migration 0012 (SQLite and PostgreSQL): the registry gains `serving_sha256`, the
rows it had stay as they were with it NULL (served through scikit-learn), and the
downgrade drops it without losing the rule of one active model."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from storage import migrate

ROW = {
    "id": "m_0123456789ab",
    "algorithm": "random_forest",
    "status": "active",
    "seed": 1,
    "file_path": "/models/m_0123456789ab.skops",
    "sha256": "a" * 64,
    "created_at": 1_796_000_000_000_000,
}


def insert(conn: object, row: dict[str, object]) -> None:
    columns = ", ".join(row)
    marks = ", ".join(f":{key}" for key in row)
    conn.execute(text(f"insert into ml_models ({columns}) values ({marks})"), row)  # type: ignore[attr-defined]


def test_the_column_comes_null_and_goes_keeping_one_active_model(db_url: str) -> None:
    migrate.upgrade(db_url, "0011")
    engine = create_engine(db_url.replace("+aiosqlite", ""))
    try:
        with engine.begin() as conn:
            insert(conn, ROW)
        migrate.upgrade(db_url)
        with engine.connect() as conn:
            found = conn.execute(text("select id, sha256, serving_sha256 from ml_models"))
            assert found.all() == [("m_0123456789ab", "a" * 64, None)]
        command.downgrade(migrate._config(db_url), "0011")
        with engine.connect() as conn:
            columns = {column["name"] for column in inspect(conn).get_columns("ml_models")}
            assert "serving_sha256" not in columns and "sha256" in columns
            rows = conn.execute(text("select id, status, sha256 from ml_models")).all()
            assert rows == [("m_0123456789ab", "active", "a" * 64)]
        with pytest.raises(IntegrityError), engine.begin() as conn:
            insert(conn, ROW | {"id": "m_second000000"})
    finally:
        engine.dispose()
