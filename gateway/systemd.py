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
    """`READY=1` once the MQTT session is up (subscribed): systemd's start is done."""

    name = "ready"

    def __init__(self, connected: asyncio.Event, host: str) -> None:
        self.connected = connected
        self.host = host

    async def run(self) -> None:
        await self.connected.wait()
        notify(f"READY=1\nSTATUS=serving on {self.host}")
        log.info("ready")


class Watchdog(Part):
    """`WATCHDOG=1` while the loop runs and the writer is not wedged; silence otherwise,
    and systemd restarts the daemon (`WatchdogSec` in the unit)."""

    name = "watchdog"

    def __init__(self, alive: Callable[[], bool]) -> None:
        self.alive = alive

    async def run(self) -> None:
        interval = watchdog_interval_s()
        if interval is None:
            return
        while True:
            if self.alive():
                notify("WATCHDOG=1")
            else:
                log.error("writer wedged: withholding watchdog pings")
            await asyncio.sleep(interval)
