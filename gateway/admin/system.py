"""The gateway's own commands: `health`, `info`, `stats`, `config/*`, `log_level`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from gateway import __version__, config
from gateway.admin.args import NoArgs, invalid
from gateway.admin.server import Command
from gateway.status import Status, started_at_text
from handlers.admin import Progress


class LogLevelArgs(msgspec.Struct, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"]


class SystemCommands:
    """Reads the daemon's status and config; reloads the config (`reload` raises
    ConfigError, and changes nothing, for a bad file); sets the log level of both
    processes (`set_log_level`)."""

    def __init__(
        self,
        status: Status,
        settings: Callable[[], config.Settings],
        config_path: Path | None,
        reload: Callable[[], Awaitable[list[str]]],
        set_log_level: Callable[[str], Awaitable[None]],
    ) -> None:
        self.status = status
        self.settings = settings
        self.config_path = config_path
        self.reload = reload
        self.set_log_level = set_log_level

    def commands(self) -> list[Command]:
        return [
            Command("health", self.health),
            Command("info", self.info),
            Command("stats", self.stats),
            Command("config/get", self.config_get),
            Command("config/reload", self.config_reload, writes=True),
            Command("log_level", self.log_level, LogLevelArgs, writes=True),
        ]

    async def health(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        return await self.status.health()

    async def info(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        settings = self.settings()
        return {
            "version": __version__,
            "instance": settings.instance,
            "started_at": started_at_text(self.status.started_at),
            "config_path": str(self.config_path or config.DEFAULT_CONFIG_PATH),
            "topic_root": settings.mqtt.topic_root,
            "database": config.hide_url_password(settings.database.url),
            "shared_group": settings.mqtt.shared_group,
        }

    async def stats(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        return await self.status.stats()

    async def config_get(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        return config.redacted(self.settings())

    async def config_reload(self, _args: NoArgs, _progress: Progress) -> dict[str, Any]:
        try:
            needs_restart = await self.reload()
        except config.ConfigError as exc:
            raise invalid(str(exc)) from None
        return {"reloaded": True, "needs_restart": needs_restart}

    async def log_level(self, args: LogLevelArgs, _progress: Progress) -> dict[str, Any]:
        await self.set_log_level(args.level)
        return {"level": args.level}
