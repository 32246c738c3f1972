"""What the project ships besides code: the broker configs and the package metadata.

A deprecation today is a broken install later: the Mosquitto configs must load
on the broker without a note, and the build must not lean on what setuptools
has announced it will remove.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, require, wait_for, wait_port

CONFIGS = ROOT / "config"


def mosquitto_says(conf_text: str, tmp_path: Path) -> str:
    """Everything Mosquitto logs while it loads `conf_text` and starts listening."""
    require("mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    log = tmp_path / "mosquitto.log"
    # As root it would drop to the `mosquitto` user, who cannot write this test's log.
    stay = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n{stay}log_dest file {log}\n{conf_text}"
    )
    with subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.STDOUT) as proc:
        try:
            wait_port(port)
            # Its last start-up line: whatever it had to say about the config came before.
            wait_for(lambda: log.exists() and " running" in log.read_text())
        finally:
            proc.terminate()
            proc.wait(10)
    return log.read_text()


def broker_settings(name: str) -> str:
    """A shipped config's broker settings, without its listeners, files and paths
    (they name this machine's ports and certificates, not what is being checked)."""
    machine = ("listener", "cafile", "certfile", "keyfile", "password_file", "acl_file",
               "persistence_location", "allow_anonymous")  # fmt: skip
    lines = (CONFIGS / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith(machine)) + "\n"


@pytest.mark.parametrize("name", ["mosquitto-fieldgate.conf", "mosquitto-production.conf.example"])
def test_broker_configs_load_without_a_deprecation_note(name: str, tmp_path: Path) -> None:
    """Checked against: the shipped `message_size_limit` (Mosquitto 2 notes that it is
    to be replaced by `max_packet_size`)."""
    settings = broker_settings(name)
    assert "max_queued_messages 1000000" in settings
    assert "max_packet_size 16777216" in settings
    logged = mosquitto_says(settings.replace("persistence true", "persistence false"), tmp_path)
    assert "running" in logged, logged
    assert not re.search(r"Note:|[Dd]eprecated|Error", logged), logged


def test_package_metadata_uses_what_setuptools_keeps() -> None:
    """The license as an SPDX string (the table form is removed after 2027-02-18) and
    a build requirement with an upper bound, so a fresh install cannot pick up the
    setuptools that removes it.

    Checked against: `license = { text = "Apache-2.0" }` and `setuptools>=69`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert re.fullmatch(r"setuptools>=\d+,<\d+", setuptools), setuptools


def test_the_unit_waits_for_every_part_to_stop() -> None:
    """systemd kills what is still running `TimeoutStopSec` after SIGTERM: the parts'
    stop timeouts, taken one after the other on a stop, must fit in it, or a slow drain
    is cut short with commits and acks in hand. Checked against: 45 s, the unit's value
    before the lanes, which the parts had outgrown (52 s, then 59 s)."""
    from gateway import config
    from gateway.daemon import Daemon

    unit = (ROOT / "systemd" / "fieldgate.service").read_text()
    (timeout,) = re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    parts = Daemon(config.Settings()).parts.parts
    assert sum(part.stop_timeout_s for part in parts) <= int(timeout)
