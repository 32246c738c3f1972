"""Fixtures: real Mosquitto, PostgreSQL and daemon processes (see tests/support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    Client,
    Daemon,
    Mosquitto,
    PostgresServer,
    daemon_env,
    pg_admin_url,
    pg_available,
    pg_database,
)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One test-owned broker for the session; tests isolate by topic root and client id."""
    mosq = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker this test may stop, restart or flood."""
    mosq = Mosquitto(tmp_path / "mosquitto").start()
    yield mosq
    mosq.stop()


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    """The shared PostgreSQL if it answers, else a throwaway cluster, else skip."""
    if pg_available():
        yield pg_admin_url()
        return
    if PostgresServer.binaries() is None:
        pytest.skip("no PostgreSQL server and no PostgreSQL binaries")
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
