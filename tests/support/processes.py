"""The real processes a test runs: Mosquitto, Redis, PostgreSQL, the daemon itself.

Nothing here mocks: a broker is the `mosquitto` binary on a free port, a Redis is
`redis-server`, a PostgreSQL cluster is `initdb` and `postgres`, the daemon is
`python -m gateway run` with its config in the environment. A test that stops,
floods or breaks a service starts one of its own here, never the shared one.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.requirements import postgres_binaries

ROOT = Path(__file__).resolve().parents[2]

COMPILED = ("gateway", "handlers", "storage", "ml", "loadgen")
"""What the processes a test or benchmark starts (daemon, engine, CLI, training
worker) import."""


def compile_project() -> None:
    """Compile the project's modules once, before any process is started.

    Each daemon, engine and CLI run is a new interpreter. Where PYTHONDONTWRITEBYTECODE
    is set (these machines' environment sets it) none of them writes bytecode, and each
    compiled the ~20,000 lines it imports again: 0.25 s of a daemon's 0.88 s start here,
    which an installed daemon (pip compiles what it installs) never pays. The files go
    to __pycache__ (ignored by git); a source edited since is compiled anew on import
    as always (bytecode records its source's mtime and size).
    """
    for package in COMPILED:
        compileall.compile_dir(ROOT / package, quiet=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def fieldgate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` as an operator runs it, to its end: output as text, the
    exit code for the test to judge."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy; return its value or fail with a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(interval)


def memory_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A process's resident memory now (`VmRSS`) or at its peak (`VmHWM`, which misses
    no spike between two readings), in MiB from /proc; None once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return round(int(value.split()[0]) / 1024, 1)
    return None


def children_running(parent: int, module: str) -> list[int]:
    """The processes whose parent is `parent` and that run `python -m module`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in argv:
            found.append(int(entry.name))
    return found


def end_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0
) -> None:
    """Ask `proc` to stop with `sig`; SIGKILL it if it has not within `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Mosquitto:
    """A test-owned broker with fieldgate's settings; persistence on by default.

    `autosave_interval` (seconds) is how often it saves its persistence file
    besides on a clean stop.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra: str = "",
        persistence: bool = True,
        autosave_interval: int = 1,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"persistence {'true' if self.persistence else 'false'}\n"
            f"persistence_location {self.workdir}/\n"
            f"autosave_interval {self.autosave_interval}\n"
            "max_queued_messages 1000000\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 10000\n"
            "max_packet_size 16777216\n"
            f"{self._stay_root()}\n"
            f"{self.extra}\n"
        )
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.port)
        return self

    def _stay_root(self) -> str:
        """As root, Mosquitto drops to the `mosquitto` user, which cannot write its
        persistence file in a test's directory: persistence would be off, unseen.
        (An `extra` that names a user itself wins.)"""
        names_user = any(line.split()[:1] == ["user"] for line in self.extra.splitlines())
        return "user root" if os.geteuid() == 0 and not names_user else ""

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """A clean stop: Mosquitto saves its persistence file.

        Not stopped within `timeout` s: `subprocess.TimeoutExpired`, or with `kill`,
        SIGKILL.
        """
        if self.proc and self.proc.poll() is None:
            if kill:
                end_process(self.proc, timeout=timeout)
            else:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class NotifySocket:
    """A `$NOTIFY_SOCKET` of our own: what systemd would receive from a daemon, in
    order, and when it first said READY=1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[str] = []
        # time.time() of the first datagram with a READY=1 line
        self.ready_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.ready_at is None and b"READY=1" in data.split(b"\n"):
                self.ready_at = time.time()
            with self._lock:
                self.received.append(data.decode())

    def messages(self) -> list[str]:
        with self._lock:
            return list(self.received)

    def count(self, message: str) -> int:
        return self.messages().count(message)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Daemon:
    """`fieldgate run` as a child process, configured by environment only."""

    def __init__(self, workdir: Path, env: dict[str, str], config_text: str = "") -> None:
        self.workdir = workdir
        self.env = env
        self.config_path = workdir / "fieldgate.toml"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "daemon.log"
        self.starts = 0

    @property
    def root(self) -> str:
        return self.env["FIELDGATE_MQTT__TOPIC_ROOT"]

    @property
    def db_url(self) -> str:
        return self.env["FIELDGATE_DATABASE__URL"]

    def start(self, wait_ready: bool = True, extra_env: dict[str, str] | None = None) -> Daemon:
        env = {**os.environ, **self.env, **(extra_env or {})}
        if "NOTIFY_SOCKET" not in (extra_env or {}):
            env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        starts = self.starts

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.log().count('"event": "ready"') >= starts

        wait_for(ready, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate()
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.proc = None


def daemon_env(
    workdir: Path, broker_port: int, db_url: str | None = None, **overrides: str
) -> dict[str, str]:
    """Environment for a daemon isolated from every other test: own root, id, database."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "FIELDGATE_MQTT__HOST": "127.0.0.1",
        "FIELDGATE_MQTT__PORT": str(broker_port),
        "FIELDGATE_MQTT__TOPIC_ROOT": f"fg{tag}",
        "FIELDGATE_MQTT__CLIENT_ID": f"fieldgate-{tag}",
        "FIELDGATE_MQTT__RECONNECT_MAX_S": "1",
        "FIELDGATE_DATABASE__URL": db_url or f"sqlite+aiosqlite:///{workdir}/fieldgate.db",
        "FIELDGATE_INSTANCE": f"test-{tag}",
        "FIELDGATE_LOG__FORMAT": "json",
        "FIELDGATE_LOG__LEVEL": "info",
    }
    env.update(
        {k if k.startswith("FIELDGATE_") else f"FIELDGATE_{k}": v for k, v in overrides.items()}
    )
    return env


class PostgresServer:
    """A throwaway PostgreSQL cluster, for machines without a shared one.

    As root, the cluster belongs to the `postgres` user (initdb refuses root), in a
    directory of its own under the system's temp dir: pytest's own temp dirs are
    private to root, and the server could not enter them. The server runs as that
    user directly (not under runuser), so that `stop()` signals the server itself.
    `stop()` keeps the cluster: `start()` brings it back on the same port (an
    outage); `close()` removes it.
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        # Tests: nothing they check survives a power cut. A benchmark passes its own.
        test_settings = {"fsync": "off"}
        self.settings = {"listen_addresses": "127.0.0.1", **(settings or test_settings)}
        self.workdir = Path(tempfile.mkdtemp(prefix="fieldgate-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else None

    def _as_user(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user, "group": self.user, "extra_groups": []}

    @staticmethod
    def binaries() -> Path | None:
        return postgres_binaries()

    def start(self) -> str:
        bindir = self.binaries()
        assert bindir is not None
        data = self.workdir / "pgdata"
        if not data.exists():
            if self.user is not None:
                shutil.chown(self.workdir, self.user)
            subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                check=True,
                capture_output=True,
                cwd=self.workdir,
                **self._as_user(),
            )
        self.proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.workdir),
                *(arg for key, value in self.settings.items() for arg in ("-c", f"{key}={value}")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
            **self._as_user(),
        )
        url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        wait_for(lambda: _accepts(url), timeout=30, interval=0.1)
        return url

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the cluster stays."""
        if self.proc is not None:
            end_process(self.proc, signal.SIGINT, 20)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class RedisServer:
    """A test-owned `redis-server` on a free port, without persistence, to stop at will;
    with `password`, it requires it (`requirepass`), and `url` carries it URL-encoded."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *("redis-server", "--bind", "127.0.0.1", "--port", str(self.port)),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                    *(("--requirepass", self.password) if self.password is not None else ()),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, timeout=10)
            self.proc = None


def _accepts(url: str) -> bool:
    """Whether the server at `url` takes a session (it listens before it does)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_a_terminal(args: Sequence[str | Path], columns: int = 160) -> tuple[int, list[str]]:
    """The CLI as a person sees it: on a pseudo-terminal (`script`) `columns` wide, with
    none of this process's FIELDGATE_ settings. Its exit code and its non-empty lines,
    colours stripped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(COLUMNS=str(columns), TERM="xterm")
    command = shlex.join([sys.executable, "-m", "gateway", *map(str, args)])
    result = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [ANSI.sub("", line).rstrip() for line in result.stdout.replace("\r", "").splitlines()]
    return result.returncode, [line for line in lines if line]
