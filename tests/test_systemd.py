"""The daemon under a (test-owned) systemd notify socket, and the unit file.

The test plays systemd: it binds the AF_UNIX datagram socket that `NOTIFY_SOCKET`
names and reads what the daemon sends: READY=1 once connected and subscribed,
WATCHDOG=1 every WATCHDOG_USEC/2 while the writer is alive (withheld while a
transaction is stuck), STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests.support import (
    ROOT,
    Client,
    Daemon,
    Mosquitto,
    NotifySocket,
    plain_url,
    require,
    results_of,
    sync_op,
    wait_for,
)

# Past this long in one transaction attempt (or with the idle loop silent), the writer
# counts as wedged. The idle loop beats every min(1 s, this / 4): at 5 s, an idle daemon
# is flagged only if its process is starved for 4 s, which a loaded 2-core machine does
# not do; at 1.5 s it did now and then.
WEDGED_AFTER_S = "5"


def wedged_lines(daemon: Daemon) -> int:
    return sum(
        1
        for line in daemon.log_lines()
        if line.get("event") == "withholding watchdog pings"
        and str(line.get("reason")).startswith("writer stuck for")
    )


def locks_waiting(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'entities'::regclass"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_ready_watchdog_wedge_and_stopping(
    pg_url: str,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    notify: NotifySocket,
) -> None:
    daemon = make_daemon(broker.port, pg_url, start=False, HEALTH__WEDGED_AFTER_S=WEDGED_AFTER_S)
    root = daemon.root
    ack = f"{root}/devices/d1/sync/ack"
    client.subscribe(ack)
    daemon.start(
        wait_ready=False,
        extra_env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
    )
    wait_for(lambda: notify.count("READY=1\nSTATUS=serving on 127.0.0.1"), timeout=30)

    # READY means subscribed: a message published right now reaches the daemon
    # (the broker would drop it for a client that has not subscribed yet).
    client.publish(f"{root}/devices/d1/sync", sync_op("op-1"))
    assert wait_for(lambda: results_of(client.on(ack))) == [
        {"op_id": "op-1", "status": "stored", "version": 1}
    ]
    wait_for(lambda: notify.count("WATCHDOG=1") >= 3)
    assert set(notify.messages()) == {"READY=1\nSTATUS=serving on 127.0.0.1", "WATCHDOG=1"}
    assert notify.count("READY=1\nSTATUS=serving on 127.0.0.1") == 1

    assert wedged_lines(daemon) == 0  # idle is not wedged
    # Wedge the writer: its transaction waits on a lock that the test holds.
    dsn = plain_url(pg_url)
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE entities IN ACCESS EXCLUSIVE MODE")
        client.publish(f"{root}/devices/d1/sync", sync_op("op-2"))
        wait_for(lambda: locks_waiting(dsn) >= 1)
        # past health.wedged_after_s the watchdog loop withholds its pings; once it
        # has said so twice, any ping sent before has long been read
        wait_for(lambda: wedged_lines(daemon) >= 2, timeout=20)
        pings = notify.count("WATCHDOG=1")
        withheld = wedged_lines(daemon)
        # five more rounds of the watchdog loop (WATCHDOG_USEC/2 each): no ping
        wait_for(lambda: wedged_lines(daemon) >= withheld + 5)
        assert notify.count("WATCHDOG=1") == pings
        assert len(results_of(client.on(ack))) == 1  # op-2 is not acked while stuck
        assert daemon.proc is not None and daemon.proc.poll() is None
        locker.rollback()

    # Released: the op commits, is acked, and the pings resume.
    assert wait_for(lambda: results_of(client.on(ack))[1:]) == [
        {"op_id": "op-2", "status": "stored", "version": 2}
    ]
    wait_for(lambda: notify.count("WATCHDOG=1") >= pings + 2)
    stalled = wedged_lines(daemon)
    resumed = notify.count("WATCHDOG=1")
    wait_for(lambda: notify.count("WATCHDOG=1") >= resumed + 3)
    assert wedged_lines(daemon) == stalled
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT op_id, version FROM sync_log ORDER BY version").fetchall()
    assert rows == [("op-1", 1), ("op-2", 2)]

    # SIGTERM: STOPPING=1, then a clean exit.
    assert daemon.proc is not None
    proc = daemon.proc
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: notify.count("STOPPING=1") == 1)
    assert proc.wait(20) == 0
    daemon.proc = None
    messages = notify.messages()
    assert messages.index("STOPPING=1") > messages.index("READY=1\nSTATUS=serving on 127.0.0.1")


def test_health_is_false_while_the_writer_is_wedged(
    pg_url: str,
    broker: Mosquitto,
    make_daemon: Callable[..., Daemon],
    client: Client,
    notify: NotifySocket,
    healthy: dict[str, Any],
) -> None:
    """Healthy means it can store operations (gateway/status.py): a wedged writer cannot.

    systemd is about to kill the daemon for it; an operator asking `health` at that
    moment must not be told that all is well.
    """
    daemon = make_daemon(broker.port, pg_url, start=False, HEALTH__WEDGED_AFTER_S=WEDGED_AFTER_S)
    root = daemon.root
    client.subscribe(f"{root}/admin/response/#")
    daemon.start(extra_env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    dsn = plain_url(pg_url)
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE entities IN ACCESS EXCLUSIVE MODE")
        client.publish(f"{root}/devices/d1/sync", sync_op("op-1"))
        wait_for(lambda: wedged_lines(daemon) >= 1, timeout=20)
        client.publish(f"{root}/admin/request/health", {"transaction": "wedged"})
        # admin still answers while the writer is stuck
        (answer,) = client.expect(1)
        locker.rollback()
    data = answer.json()["data"]
    stuck = re.fullmatch(r"writer stuck for (\d+) s", data["checks"]["engine"]["detail"])
    assert stuck is not None, data
    assert int(stuck.group(1)) >= int(WEDGED_AFTER_S)
    assert data == {
        "healthy": False,
        "checks": {
            "mqtt": healthy["checks"]["mqtt"],
            "engine": {"ok": False, "detail": stuck.group(0)},
            "database": {"ok": True},  # it answers; only the locked table does not
            "redis": healthy["checks"]["redis"],
            "model": healthy["checks"]["model"],
            "parts": {"ok": True},
        },
    }


def test_no_notify_socket_no_watchdog(
    broker: Mosquitto, make_daemon: Callable[..., Daemon], client: Client
) -> None:
    """Outside systemd the daemon runs as well: no socket, no pings, no errors."""
    daemon = make_daemon(broker.port)
    root = daemon.root
    ack = f"{root}/devices/d1/sync/ack"
    client.subscribe(ack)
    client.publish(f"{root}/devices/d1/sync", sync_op("op-1"))
    assert wait_for(lambda: results_of(client.on(ack))) == [
        {"op_id": "op-1", "status": "stored", "version": 1}
    ]
    assert daemon.terminate() == 0
    assert wedged_lines(daemon) == 0
    assert not [line for line in daemon.log_lines() if line.get("level") == "error"]


def test_unit_file_verifies(tmp_path: Path) -> None:
    require("systemd-analyze")
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    binary = Path(sys.executable).parent / "fieldgate"
    assert binary.exists(), binary
    source = (ROOT / "systemd" / "fieldgate.service").read_text()
    exec_start = [line for line in source.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == [
        "ExecStart=/opt/fieldgate/.venv/bin/fieldgate run --config /etc/fieldgate/fieldgate.toml"
    ]
    unit = tmp_path / "fieldgate.service"
    unit.write_text(
        source.replace(exec_start[0], f"ExecStart={binary} run --config /etc/fieldgate/x.toml")
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 even for unknown keys and bad values; those come as warnings
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "fieldgate.service" in line
    ]
    assert result.returncode == 0, result
    assert complaints == []
    assert "Type=notify" in source
    assert "WatchdogSec=30" in source
