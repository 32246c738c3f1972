"""Real parts for tests: a Mosquitto per test session (or per test), a PostgreSQL
database per test, the daemon as a real process, and a small MQTT client.

Nothing here mocks: a broker is the `mosquitto` binary on a free port, the
daemon is `python -m gateway run` with its config in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from handlers.alerts import AlertNotices
from storage.alerts import AlertPolicy, AlertStep, CrisisAckStep
from storage.sync import SyncStep
from storage.writer import Writer
from tests.conflict_oracle import Expected, as_expected

ROOT = Path(__file__).resolve().parent.parent


SPINE_ONLY = {"CONFLICTS__ENABLED": "false"}
"""These streams edit one field of a few entities from many devices at one instant:
every pair conflicts, quadratically (3000 ops make ~167,000 conflicts and their
notices). That is conflict detection's worst case, tested in its own suite; here
it would only bury what these tests prove about storing and acknowledging."""


STATS_KEYS = frozenset(
    {
        "since",
        "uptime_s",
        "ops",
        "rejected_by_code",
        "messages",
        "commits",
        "queues",
        "outbox",
        "alerts",
        "open_crises",
        "escalations",
        "conflicts",
        "conflict_members",
    }
)
"""Every key of the `stats` answer (also carried by the retained health report)."""


HEALTHY = {
    "healthy": True,
    "checks": {
        "mqtt": {"ok": True, "reconnects": 0},
        "database": {"ok": True},
        "redis": {"ok": True},
        "model": {"ok": True, "detail": "no model active"},
    },
}
"""The `health` answer's data from a test daemon with nothing wrong."""


def plain_writer(engine: Any) -> Writer:
    """A writer of ops, alerts and crisis acks with the default rules, no conflict
    detection: the daemon's writer without what these tests do not look at."""
    return Writer(engine, [AlertStep(AlertPolicy(), AlertNotices()), CrisisAckStep(), SyncStep()])


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


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Client:
    """A paho client on a background thread, collecting what it receives."""

    port: int
    client_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:10]}")
    v5: bool = True
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol
        )
        if self.username:
            self.paho.username_pw_set(self.username, self.password)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.all: list[Received] = []
        self._lock = threading.Lock()
        self.paho.on_message = self._on_message
        self.connected = threading.Event()
        self.paho.on_connect = lambda *a: self.connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        received = Received(
            msg.topic, bytes(msg.payload), bool(msg.retain), getattr(props, "CorrelationData", None)
        )
        with self._lock:
            self.all.append(received)
        self.messages.put(received)

    def connect(self) -> Client:
        if self.v5:
            self.paho.connect("127.0.0.1", self.port, clean_start=True)
        else:
            self.paho.connect("127.0.0.1", self.port)
        self.paho.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("test client did not connect")
        return self

    def subscribe(self, *topics: str) -> Client:
        for topic in topics:
            info = self.paho.subscribe(topic, qos=1)
            assert info[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)
        return self

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any] | list[Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
        retain: bool = False,
        wait: bool = True,
    ) -> mqtt.MQTTMessageInfo:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait:
            info.wait_for_publish(10)
        return info

    def expect(self, count: int = 1, timeout: float = 15.0) -> list[Received]:
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"got {len(out)} of {count} messages: {out!r}")
            with contextlib.suppress(queue.Empty):
                out.append(self.messages.get(timeout=remaining))
        return out

    def quiet(self, seconds: float = 0.5) -> list[Received]:
        """Whatever arrives within `seconds` (to assert that nothing more came)."""
        out: list[Received] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                out.append(self.messages.get(timeout=remaining))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()


@dataclass
class PersistentClient(Client):
    """A subscriber whose session outlives its connection: the broker queues for it
    while it is away (a broker restart included, with persistence on), and paho
    reconnects it by itself, after 1 s and then every `reconnect_max_s` at most."""

    reconnect_max_s: int = 1

    def connect(self) -> PersistentClient:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.paho.reconnect_delay_set(1, self.reconnect_max_s)
        self.paho.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.paho.loop_start()
        if not self.connected.wait(10):
            raise TimeoutError("test client did not connect")
        return self


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


def pg_admin_url() -> str:
    return os.environ.get("FIELDGATE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(pg_admin_url(), connect_timeout=2):
            return True
    except Exception:
        return False


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
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        return found[-1].parent if found else None

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
        wait_port(self.port, 30)
        time.sleep(0.5)
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the cluster stays."""
        if self.proc is not None:
            end_process(self.proc, signal.SIGINT, 20)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A fresh database for one test; dropped after. Yields a SQLAlchemy async URL."""
    import psycopg

    name = f"fg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sync_op(
    op_id: str,
    *,
    entity_id: str = "t1",
    entity_type: str = "task",
    operation: str = "update",
    changes: dict[str, Any] | None = None,
    user_id: str = "u1",
    edited_at: str = "2026-11-29T12:00:00Z",
    **extra: Any,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op_id": op_id,
        "user_id": user_id,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "operation": operation,
        "changes": {"status": {"old": "open", "new": "done"}} if changes is None else changes,
        "edited_at": edited_at,
    }
    op.update(extra)
    return op


# -- helpers for the ingest, crash and restart tests ---------------------------


def db_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    """Rows of `query` read straight from a daemon's database (SQLite file or PostgreSQL)."""
    if url.startswith("sqlite"):
        import sqlite3

        path = url.split("///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            return conn.execute(query).fetchall()
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn) as conn:
        return [tuple(row) for row in conn.execute(query).fetchall()]


def ack_results(messages: list[Received]) -> list[dict[str, Any]]:
    """The results of sync acks, in order, whether one payload's or several coalesced.

    Checks the shape of each ack message on the way: `{"batch_id", "results"}` for
    one payload, `{"batch_ids", "results"}` for several committed together.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        body = message.json()
        assert set(body) in ({"batch_id", "results"}, {"batch_ids", "results"}), body
        assert isinstance(body["results"], list)
        assert body["results"], body
        out.extend(body["results"])
    return out


def expect_results(client: Client, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait for `count` sync results on whatever ack messages carry them."""
    messages: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(ack_results(messages)) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {ack_results(messages)!r}, expected {count} results")
        with contextlib.suppress(queue.Empty):
            messages.append(client.messages.get(timeout=remaining))
    return ack_results(messages)


class AckRecorder:
    """Subscribes to every device's sync acks under `root` and keeps every result."""

    def __init__(self, port: int, root: str) -> None:
        self.client = Client(port)
        self.client.paho.reconnect_delay_set(min_delay=1, max_delay=2)
        self.topic = f"{root}/devices/+/sync/ack"
        self.client.paho.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(self.topic, qos=1)
        self.client.connected.set()

    def start(self) -> AckRecorder:
        self.client.connect()
        time.sleep(0.2)
        return self

    def results(self) -> list[dict[str, Any]]:
        with self.client._lock:
            messages = list(self.client.all)
        return ack_results(messages)

    def close(self) -> None:
        self.client.close()


def _pubacked(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged it.

    A QoS 1 publish made while disconnected reports `MQTT_ERR_NO_CONN` (and
    `is_published()` raises), yet paho keeps it and sends it on reconnect; its
    PUBACK is then recorded all the same.
    """
    if info.rc == mqtt.MQTT_ERR_NO_CONN:
        return bool(info._published)
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


class OpStream:
    """Publishes `(device_id, op)` pairs at QoS 1 from a background thread.

    Paced (`chunk` messages, then `pause_s`) so that a test can break things
    mid-stream; `reached` is set once `mark` messages were handed to paho. Every
    publish is kept, so that the test can see which ones the broker PUBACKed and
    republish the others (op_id makes that harmless).
    """

    def __init__(
        self,
        port: int,
        root: str,
        ops: list[tuple[str, dict[str, Any]]],
        *,
        chunk: int = 25,
        pause_s: float = 0.01,
        mark: int = 0,
    ) -> None:
        self.port = port
        self.root = root
        self.ops = ops
        self.chunk = chunk
        self.pause_s = pause_s
        self.mark = mark
        self.reached = threading.Event()
        self.client = Client(port)
        self.client.paho.reconnect_delay_set(min_delay=1, max_delay=2)
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.thread = threading.Thread(target=self._run, name="op-stream", daemon=True)
        self.error: BaseException | None = None

    def topic(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/sync"

    def start(self) -> OpStream:
        self.client.connect()
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            for index, (device_id, op) in enumerate(self.ops):
                info = self.client.paho.publish(self.topic(device_id), json.dumps(op), qos=1)
                self.infos.append(info)
                if index + 1 >= self.mark:
                    self.reached.set()
                if (index + 1) % self.chunk == 0:
                    time.sleep(self.pause_s)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.reached.set()

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the publisher did not finish"
        assert self.error is None, self.error

    def unacked(self) -> list[int]:
        return [index for index, info in enumerate(self.infos) if not _pubacked(info)]

    def puback_all(self, timeout: float = 60.0) -> int:
        """Wait for every PUBACK; republish what the broker never acknowledged.

        Returns how many were republished (0 when the broker acked them all).
        """
        self.join(timeout)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not self.unacked(), timeout=min(timeout, 15.0))
        missing = self.unacked()
        if not missing:
            return 0
        again = Client(self.port).connect()
        try:
            infos = [
                again.paho.publish(self.topic(self.ops[i][0]), json.dumps(self.ops[i][1]), qos=1)
                for i in missing
            ]
            for info in infos:
                info.wait_for_publish(timeout)
                assert info.is_published()
        finally:
            again.close()
        return len(missing)

    def close(self) -> None:
        self.client.close()


# -- conflict records ------------------------------------------------------------


def stored_conflicts(url: str) -> list[Expected]:
    """A daemon's conflicts (not merged), read from its database in the oracle's terms."""
    members: dict[str, list[str]] = {}
    for conflict_id, op_id in db_rows(url, "select conflict_id, op_id from conflict_members"):
        members.setdefault(conflict_id, []).append(op_id)
    rows = db_rows(
        url,
        "select conflict_id, fields, severity, status, winners, member_count from conflicts"
        " where status != 'merged'",
    )
    return [
        as_expected(
            {
                "fields": json.loads(fields),
                "severity": severity,
                "status": status,
                "winners": json.loads(winners),
                "member_count": count,
            },
            members.get(conflict_id, []),
        )
        for conflict_id, fields, severity, status, winners, count in rows
    ]
