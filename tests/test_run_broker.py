"""The broker `make run` uses (scripts/broker.sh), chosen against real Mosquittos.

Mosquitto's default `max_queued_messages` of 1000 drops the QoS 1 messages queued for
the gateway's session past it. `make run` gives the system broker
config/mosquitto-fieldgate.conf as a drop-in where its config reads an include_dir;
where it does not (a system Mosquitto without conf.d), it runs a Mosquitto of its own
and writes var/broker.env, through which the daemon and the README's next commands,
run from the same directory, reach it. Each test points the script at a layout of its
own (the system broker's config, init script and port, `var/`), never at the machine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    Client,
    PersistentClient,
    daemon_env,
    end_process,
    free_port,
    require,
    wait_for,
    wait_port,
)

SETTINGS = ROOT / "config" / "mosquitto-fieldgate.conf"
BACKLOG = 1500
"""Messages queued for an offline session: past the default limit of 1000."""


def run_script(system: Path, system_port: int, own_port: int, var: Path) -> str:
    """scripts/broker.sh against the system broker in `system` (see `system_broker`);
    what it says (it must succeed)."""
    env = {
        **os.environ,
        "BROKER_SYSTEM_CONF": str(system / "mosquitto.conf"),
        "BROKER_SYSTEM_INIT": str(system / "init"),
        "BROKER_SYSTEM_PORT": str(system_port),
        "BROKER_OWN_PORT": str(own_port),
        "BROKER_VAR": str(var),
    }
    done = subprocess.run(
        [str(ROOT / "scripts" / "broker.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout


def listening(port: int) -> bool:
    with contextlib.suppress(TimeoutError):
        wait_port(port, timeout=0.2)
        return True
    return False


INIT_SCRIPT = """#!/bin/sh
# The test's stand-in for /etc/init.d/mosquitto: the broker of {conf}, by its pid file.
running() {{ pid=$(cat {pid} 2>/dev/null) && [ -d /proc/$pid ]; }}
case "$1" in
  status) running ;;
  start) running || mosquitto -d -c {conf} ;;
  stop) if running; then kill $pid; while [ -d /proc/$pid ]; do sleep 0.05; done; fi ;;
  restart) "$0" stop && "$0" start ;;
esac
"""


def system_broker(layout: Path, port: int, include_dir: bool) -> Path:
    """A Mosquitto as a distribution runs it, started by its init script (returned):
    Mosquitto's own queue limits, and an include_dir or not. Stopped by the `layout`
    fixture."""
    layout.mkdir()
    conf = layout / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        f"pid_file {layout}/mosquitto.pid",
        f"log_dest file {layout}/mosquitto.log",
        # As root it would drop to the `mosquitto` user, who cannot write this log.
        "user root" if os.geteuid() == 0 else "",
    ]
    if include_dir:
        (layout / "conf.d").mkdir()
        lines.append(f"include_dir {layout}/conf.d")
    conf.write_text("\n".join(lines) + "\n")
    init = layout / "init"
    init.write_text(INIT_SCRIPT.format(conf=conf, pid=layout / "mosquitto.pid"))
    init.chmod(0o755)
    subprocess.run([init, "start"], check=True, timeout=10)
    wait_port(port)
    return init


def stop_pid_file(pid_file: Path) -> None:
    """Stop the Mosquitto of `pid_file`, a daemon (no child of the test), if it runs."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto":
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Path]:
    """Where the test's system broker lives (`system/`) and the script's `var/`; both
    brokers are stopped afterwards."""
    require("mosquitto")
    yield tmp_path
    stop_pid_file(tmp_path / "system" / "mosquitto.pid")
    stop_pid_file(tmp_path / "var" / "mosquitto" / "mosquitto.pid")


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fieldgate ARGS` run from `cwd`, as from the repository after `make run`."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def delivered_after_offline(port: int, count: int = BACKLOG) -> int:
    """How many of `count` QoS 1 messages, published while a persistent session was
    away, the broker delivers when it is back."""
    topic = f"backlog/{time.monotonic_ns()}"
    subscriber = PersistentClient(port).connect().subscribe(topic)
    subscriber.close()
    publisher = Client(port).connect()
    try:
        infos = [publisher.publish(topic, str(i), wait=False) for i in range(count)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        publisher.close()
    back = PersistentClient(port, client_id=subscriber.client_id).connect()
    try:
        seen = -1
        while seen != len(back.all):  # until nothing more came for a second
            seen = len(back.all)
            time.sleep(1)
        return seen
    finally:
        back.close()


def test_without_an_include_dir_make_run_runs_its_own_broker_and_the_cli_follows(
    layout: Path,
) -> None:
    """The broker of fieldgate's own, said in one line, queues past 1000 (the system's
    does not), is kept across runs, and the daemon, `admin` and `simulate` meet on it.

    Checked against: an own broker started without config/mosquitto-fieldgate.conf
    (it delivered 1000 of 1500), as the script before this one left the daemon on the
    system broker here with only a warning."""
    system, var = layout / "system", layout / "var"
    system_port, own_port = free_port(), free_port()
    system_broker(system, system_port, include_dir=False)

    said = run_script(system, system_port, own_port, var)
    assert said == (
        f"services: mosquitto: fieldgate's own on 127.0.0.1:{own_port} "
        f"({system}/mosquitto.conf has no include_dir for config/mosquitto-fieldgate.conf); "
        f"fieldgate commands here find it in {var}/broker.env; mosquitto_sub/pub: -p {own_port}\n"
    )
    assert listening(own_port)
    assert (var / "broker.env").read_text().splitlines()[-2:] == [
        "FIELDGATE_MQTT__HOST=127.0.0.1",
        f"FIELDGATE_MQTT__PORT={own_port}",
    ]
    assert delivered_after_offline(system_port) < BACKLOG  # why: the system's drops
    assert delivered_after_offline(own_port) == BACKLOG

    # Again, as at the next `make run`: the same broker, kept, and the same line.
    pid = (var / "mosquitto" / "mosquitto.pid").read_text()
    assert run_script(system, system_port, own_port, var) == said
    assert (var / "mosquitto" / "mosquitto.pid").read_text() == pid

    # The daemon and the README's next commands, run where var/ is, with the default
    # config and no broker of their own in the environment, meet on that broker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}
    env.update(daemon_env(layout, 0))
    del env["FIELDGATE_MQTT__HOST"], env["FIELDGATE_MQTT__PORT"]
    env.pop("NOTIFY_SOCKET", None)
    watcher = Client(own_port).connect().subscribe(f"{env['FIELDGATE_MQTT__TOPIC_ROOT']}/status")
    log_path = layout / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run"],
            cwd=layout,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: '"event": "ready"' in log_path.read_text(), timeout=30)
        assert watcher.expect()[0].json()["state"] == "online"

        health = cli(layout, env, "admin", "health", "--json-output")
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout)["data"]["checks"]["mqtt"]["ok"] is True
        simulated = cli(
            layout, env, "simulate", "--devices", "2", "--count", "20", "--rate", "0", "--json"
        )
        assert simulated.returncode == 0, simulated.stdout + simulated.stderr
        summary = json.loads(simulated.stdout)
        assert summary["broker"] == f"127.0.0.1:{own_port}"
        assert summary["unanswered"] == 0
    finally:
        watcher.close()
        end_process(daemon)


def test_with_an_include_dir_the_system_broker_takes_the_settings_and_is_used(
    layout: Path,
) -> None:
    """The drop-in is installed and the broker restarted to read it; a var/broker.env
    left from a run on a broker of fieldgate's own is removed, so that the commands go
    to the system broker again.

    Checked against: a SIGHUP instead of the restart. mosquitto.conf(5) says it reloads
    `max_queued_messages`; Mosquitto 2.0.11 kept dropping past 1000 (as
    eclipse-mosquitto/mosquitto#2202 says: not possible at run time)."""
    system, var = layout / "system", layout / "var"
    system_port, own_port = free_port(), free_port()
    system_broker(system, system_port, include_dir=True)
    before = (system / "mosquitto.pid").read_text()
    var.mkdir()
    (var / "broker.env").write_text("FIELDGATE_MQTT__PORT=18830\n")

    said = run_script(system, system_port, own_port, var)
    assert said == (
        f"services: mosquitto: the system's on 127.0.0.1:{system_port}, with "
        f"config/mosquitto-fieldgate.conf as {system}/conf.d/fieldgate.conf "
        "(installed now, restarted)\n"
    )
    assert (system / "conf.d" / "fieldgate.conf").read_bytes() == SETTINGS.read_bytes()
    restarted = (system / "mosquitto.pid").read_text()
    assert restarted != before
    assert not (var / "broker.env").exists()
    assert not listening(own_port)
    assert delivered_after_offline(system_port) == BACKLOG

    # At the next `make run`: nothing to install, no restart.
    assert run_script(system, system_port, own_port, var) == (
        f"services: mosquitto: the system's on 127.0.0.1:{system_port}, with "
        f"config/mosquitto-fieldgate.conf as {system}/conf.d/fieldgate.conf\n"
    )
    assert (system / "mosquitto.pid").read_text() == restarted


def test_var_broker_env_gives_way_to_the_environment_and_to_a_config_named_otherwise(
    tmp_path: Path,
) -> None:
    """Which broker a command tries, said by its refusal: var/broker.env's with the
    default config (named or not), the environment's over it, and a named config's
    own. No broker listens on any of the three ports.

    Checked against: reading var/broker.env whatever config is named (an operator's
    `--config /etc/fieldgate/fieldgate.toml` run from a checkout would go to the
    checkout's broker), and letting it override the environment."""
    from_file, from_env, from_config = free_port(), free_port(), free_port()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "broker.env").write_text(
        f"# a comment\nFIELDGATE_MQTT__HOST=127.0.0.1\nFIELDGATE_MQTT__PORT={from_file}\n"
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "fieldgate.toml").write_text("[mqtt]\nport = 1\n")
    (tmp_path / "other.toml").write_text(f"[mqtt]\nport = {from_config}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDGATE_")}

    def tried(extra_env: dict[str, str], *args: str) -> str:
        result = cli(tmp_path, {**env, **extra_env}, "status", *args)
        assert result.returncode == 3, result
        return result.stderr.split(": ")[1]

    def at(port: int) -> str:
        return f"cannot reach the broker at 127.0.0.1:{port}"

    assert tried({}) == at(from_file)
    assert tried({}, "--config", "config/fieldgate.toml") == at(from_file)
    assert tried({"FIELDGATE_CONFIG": "config/fieldgate.toml"}) == at(from_file)
    assert tried({"FIELDGATE_MQTT__PORT": str(from_env)}) == at(from_env)
    assert tried({}, "--config", "other.toml") == at(from_config)
