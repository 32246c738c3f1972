"""Starting the daemon's child processes (the engine's, the webhook poster's), with
nothing but the standard library.

`fieldgate run` starts its engine process before its own imports (gateway/__main__.py),
so that the two processes import side by side: one after the other they took 1.5 s
of a start measured behind a backlog, before the first crisis could be committed
(benchmarks/backlog_priority.py). The early process waits on its channel for the
settings (`Start`); a process whose parent dies before sending them reads the end of
the channel and exits. The engine started again after a death is started here too,
and the poster process (gateway/outbound/poster_process.py) whenever it is needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import NamedTuple

ENV_PREFIX = "FIELDGATE_"
"""The prefix of fieldgate's settings in the environment (gateway.config reads it)."""


class Started(NamedTuple):
    process: subprocess.Popen[bytes]
    channel: socket.socket
    """The MQTT process's end of the socketpair."""


_early: list[Started] = []
"""The process `start_early` started, until `take` hands it over."""


def engine_environment() -> dict[str, str]:
    """The environment without fieldgate's settings: the engine runs with those the
    MQTT process sends (`Start`, `Reload`), which the environment must not override
    (pydantic-settings would let it: a `log_level` command would not reach it)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


ENGINE = "gateway.ingest.process"


def start(module: str = ENGINE, *args: str) -> Started:
    """A new child process running `module` (the engine's by default), waiting on the
    returned channel; `args` follow the channel's descriptor on its command line."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno()), *args],
            pass_fds=[theirs.fileno()],
            env=engine_environment(),
        )
    finally:
        theirs.close()
    return Started(process, ours)


def start_early() -> None:
    """Start the first engine process now, for `take` to hand over."""
    _early.append(start())


def take() -> Started:
    """The engine process started early, the first time; a new one after that."""
    return _early.pop() if _early else start()
