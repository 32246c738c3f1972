"""Databases for tests: the shared PostgreSQL, a fresh database per test, reading rows.

A test reads a daemon's rows straight from its database (the SQLite file or the
PostgreSQL database), never through the daemon's own code.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from handlers.alerts import AlertNotices
from storage.alerts import AlertPolicy, AlertStep, CrisisAckStep
from storage.conflict_store import WAITING_SQL
from storage.sync import SyncStep
from storage.writer import Writer


def pg_admin_url() -> str:
    return os.environ.get("FIELDGATE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    """Whether the shared PostgreSQL answers."""
    try:
        with psycopg.connect(pg_admin_url(), connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def plain_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextlib.contextmanager
def pg_database(admin_url: str, options: str = "") -> Iterator[str]:
    """A fresh database for one test (`options` of CREATE DATABASE: an encoding...);
    dropped after. Yields a SQLAlchemy async URL."""
    name = f"fg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" {options}')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_path(url: str) -> str:
    return url.split("///", 1)[1]


def db_rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of `query` read straight from a database (SQLite file or PostgreSQL).

    Parameters are `?` on SQLite and `%s` on PostgreSQL (each driver's own style).
    """
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(sqlite_path(url), timeout=30)) as conn:
            return conn.execute(query, params).fetchall()
    with psycopg.connect(plain_url(url)) as conn:
        # Without parameters, no placeholders: a `%` in a LIKE pattern stays as it is.
        rows = conn.execute(query, params).fetchall() if params else conn.execute(query).fetchall()
        return [tuple(row) for row in rows]


def plain_writer(engine: Any) -> Writer:
    """A writer of ops, alerts and crisis acks with the default rules, no conflict
    detection: the daemon's writer without what these tests do not look at."""
    return Writer(engine, [AlertStep(AlertPolicy(), AlertNotices()), CrisisAckStep(), SyncStep()])


def outbox_sent(url: str) -> bool:
    """Whether every MQTT message of the outbox has been published and PUBACKed."""
    unsent = "select count(*) from outbox where sent_at is null and channel = 'mqtt'"
    return db_rows(url, unsent) == [(0,)]


def judged(url: str) -> bool:
    """Whether conflict detection, which runs after the ack, has judged every stored
    operation (storage/detection.py)."""
    rows = db_rows(url, WAITING_SQL)
    return bool(rows[0][0] == 0)
