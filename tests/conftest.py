"""Fixtures: real Mosquitto, Redis, PostgreSQL and daemon processes (see tests/support/).

A fixture whose service or tool is missing skips its test locally and fails it in
CI (`tests.support.require`). Every test that reaches PostgreSQL carries the
`postgres` marker, given here at collection: `-m "not postgres"` leaves them all out.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from storage import migrate
from storage.db import create_engine
from tests.support import (
    HEALTHY,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    PostgresServer,
    RedisServer,
    compile_project,
    daemon_env,
    pg_admin_url,
    pg_available,
    pg_database,
    require,
)

POSTGRES_FIXTURES = frozenset({"pg_admin", "private_pg"})


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules once, before any test starts a process
    (`compile_project`). An xdist worker leaves it to the controller, which configures
    before it starts them."""
    if hasattr(config, "workerinput"):
        return
    compile_project()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that reaches PostgreSQL `postgres`: through a fixture of
    POSTGRES_FIXTURES, or as the `postgres` case of a database parameter."""
    postgres = pytest.mark.postgres
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        params: dict[str, Any] = callspec.params if callspec is not None else {}
        if fixtures & POSTGRES_FIXTURES or "postgres" in params.values():
            item.add_marker(postgres)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One test-owned broker for the session; tests isolate by topic root and client id."""
    require("mosquitto")
    mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker this test may stop, restart or flood (persistence on, kept across restarts)."""
    require("mosquitto")
    mosq = Mosquitto(tmp_path / "mosquitto").start()
    yield mosq
    mosq.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis this test may stop."""
    require("redis-server")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def healthy() -> dict[str, Any]:
    """The `health` data of a test daemon with nothing wrong; needs the shared Redis."""
    require("redis")
    return HEALTHY


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """The shared PostgreSQL if it answers, else a throwaway cluster of the session."""
    if pg_available():
        yield pg_admin_url()
        return
    require("postgres-binaries")
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_admin: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test (SQLAlchemy async URL)."""
    with pg_database(pg_admin) as url:
        yield url


@pytest.fixture
def private_pg() -> Iterator[PostgresServer]:
    """A cluster of this test's own, which it stops and starts again (call `start()`)."""
    require("postgres-binaries")
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage-facing test once on SQLite and once on PostgreSQL (marked `postgres`)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/fieldgate.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated database of `db_url` (SQLite and PostgreSQL), disposed after the test."""
    await migrate.upgrade_async(db_url)
    database = create_engine(db_url)
    yield database
    await database.dispose()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """`make_daemon(broker_port, db_url=None, config_text="", **env)` -> a started daemon."""
    made: list[Daemon] = []

    def make(
        port: int,
        db_url: str | None = None,
        config_text: str = "",
        start: bool = True,
        **overrides: str,
    ) -> Daemon:
        workdir = tmp_path / f"daemon{len(made)}"
        workdir.mkdir()
        daemon = Daemon(workdir, daemon_env(workdir, port, db_url, **overrides), config_text)
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        daemon.stop()


@pytest.fixture
def client(broker: Mosquitto) -> Iterator[Client]:
    c = Client(broker.port).connect()
    yield c
    c.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """systemd's socket, in a short directory of its own: an AF_UNIX path is at most
    107 bytes, and pytest's per-test directories can be longer."""
    directory = Path(tempfile.mkdtemp(prefix="fg-notify-"))
    sock = NotifySocket(directory / "notify.sock")
    yield sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)
