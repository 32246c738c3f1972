"""What the suite needs from the machine, and what a test does when it is missing.

Locally a test whose service or tool is missing is skipped, with the reason. In CI
(`CI=true`) nothing may be skipped silently: the test fails, saying what to
install (scripts/services.sh --test installs and starts all of it).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def postgres_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (for clusters of a test's own)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@dataclass(frozen=True)
class Requirement:
    what: str
    present: Callable[[], bool]
    install: str


def _tool(name: str, package: str) -> Requirement:
    return Requirement(
        f"the `{name}` command",
        lambda: shutil.which(name) is not None,
        f"apt-get install {package}",
    )


REQUIREMENTS = {
    "mosquitto": _tool("mosquitto", "mosquitto"),
    "mosquitto_passwd": _tool("mosquitto_passwd", "mosquitto"),
    "openssl": _tool("openssl", "openssl"),
    "redis-server": _tool("redis-server", "redis-server"),
    "redis": Requirement(
        "a Redis on 127.0.0.1:6379",
        lambda: _listening(6379),
        "apt-get install redis-server, then scripts/services.sh starts it",
    ),
    "postgres-binaries": Requirement(
        "PostgreSQL's server binaries (/usr/lib/postgresql/*/bin)",
        lambda: postgres_binaries() is not None,
        "apt-get install postgresql (scripts/services.sh --test does)",
    ),
    "systemd-analyze": _tool("systemd-analyze", "systemd"),
    "script": _tool("script", "bsdutils (util-linux's `script`)"),
}


def require(name: str) -> None:
    """Skip the calling test (locally) or fail it (CI) if `name` is missing."""
    requirement = REQUIREMENTS[name]
    if requirement.present():
        return
    message = f"{requirement.what} is missing: {requirement.install}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)
