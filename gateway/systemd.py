"""systemd glue: sd_notify without a dependency (one datagram to `$NOTIFY_SOCKET`), and
the parts that tell systemd the daemon is ready and alive."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import structlog

from gateway.lifecycle import Part

log = structlog.get_logger("fieldgate.daemon")


def notify(state: str) -> bool:
    """Send `READY=1`, `WATCHDOG=1`, `STOPPING=1`...; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of `WatchdogSec`, as systemd advises; None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


class ReadyNotice(Part):
    """`READY=1` once the MQTT session is up (subscribed) and the engine serves:
    systemd's start is done."""

    name = "ready"

    def __init__(self, host: str, *conditions: asyncio.Event) -> None:
        self.serving = f"serving on {host}"
        """The status line while nothing is wrong."""
        self.conditions = conditions
        self.sent = asyncio.Event()

    async def run(self) -> None:
        for condition in self.conditions:
            await condition.wait()
        notify(f"READY=1\nSTATUS={self.serving}")
        self.sent.set()
        log.info("ready")


STATUS_EVERY_S = 1.0
"""How often the status line is judged again."""


class StatusLine(Part):
    """`STATUS=` that follows the daemon's trouble once it is ready: what `systemctl
    status` shows. Through a database outage the watchdog keeps pinging (a restart
    would not bring the database back), so without this the line said `serving`
    while `health` said the commits fail; now it says `unhealthy: ...` until they
    commit again, then `serving on ...`. Sent only when it changes."""

    name = "status line"

    def __init__(self, ready: ReadyNotice, unhealthy: Callable[[], str | None]) -> None:
        self.ready = ready
        self.unhealthy = unhealthy
        """What is wrong, in a few words; None when nothing is."""

    async def run(self) -> None:
        await self.ready.sent.wait()
        said = self.ready.serving
        while True:
            trouble = self.unhealthy()
            line = self.ready.serving if trouble is None else f"unhealthy: {trouble}"
            if line != said and notify(f"STATUS={line}"):
                said = line
            await asyncio.sleep(STATUS_EVERY_S)


class Watchdog(Part):
    """`WATCHDOG=1` while the engine serves and its writer is not wedged; silence
    otherwise, and systemd restarts the daemon (`WatchdogSec` in the unit). It starts
    judging once the daemon is ready, as systemd does."""

    name = "watchdog"

    def __init__(self, trouble: Callable[[], str | None], *ready: asyncio.Event) -> None:
        self.trouble = trouble
        """Why the daemon cannot store now (None: it can)."""
        self.ready = ready

    async def run(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        for condition in self.ready:
            await condition.wait()
        while True:
            trouble = self.trouble()
            if trouble is None:
                notify("WATCHDOG=1")
            else:
                log.error("withholding watchdog pings", reason=trouble)
            await asyncio.sleep(interval)
