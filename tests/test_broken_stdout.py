"""A daemon whose stdout has gone away still serves and still stops on SIGTERM.

journald restarting, or the reader of a pipe exiting (`fieldgate run | tail`),
leaves the daemon writing its log into a closed pipe. It used to raise from
the SIGTERM handler's log line, so the stop was never requested: the process
could only be killed. Now the lost lines are dropped and the stop is clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT, Client, Mosquitto, daemon_env, sync_op, wait_for


def test_sigterm_stops_a_daemon_whose_stdout_is_closed(
    broker: Mosquitto, client: Client, tmp_path: Path
) -> None:
    env = {**os.environ, **daemon_env(tmp_path, broker.port)}
    env.pop("NOTIFY_SOCKET", None)
    root = env["FIELDGATE_MQTT__TOPIC_ROOT"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "ready":
                break
        proc.stdout.close()

        ack = f"{root}/devices/d1/sync/ack"
        client.subscribe(ack)
        client.publish(f"{root}/devices/d1/sync", sync_op("op-after-close"))
        wait_for(lambda: any(m.topic == ack for m in list(client.all)))
        (message,) = [m for m in client.all if m.topic == ack]
        assert [r["status"] for r in message.json()["results"]] == ["stored"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
