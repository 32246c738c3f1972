"""What every `fieldgate` command shares: the `--config` option and loading it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from gateway import config

EXIT_USAGE = 2

LOCAL_BROKER_ENV = Path("var/broker.env")
"""Where `make run` says which broker it started, when the system's cannot take fieldgate's
settings (scripts/broker.sh): `FIELDGATE_MQTT__HOST` and `FIELDGATE_MQTT__PORT` lines."""

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"TOML config file [default: {config.DEFAULT_CONFIG_PATH}]",
        envvar="FIELDGATE_CONFIG",
        show_default=False,
    ),
]


def load_settings(path: Path | None) -> config.Settings:
    """Load the config (and the environment over it) or exit 2 with its one-line reason.

    With the default config, named or not, the broker `make run` started is used: the
    README's next commands (`fieldgate simulate`, `fieldgate admin ...`) must reach the
    daemon's broker without the reader typing its port. A config named otherwise is an
    operator's own, and says where its broker is.
    """
    if path is None or path.resolve() == config.DEFAULT_CONFIG_PATH.resolve():
        _use_local_broker(LOCAL_BROKER_ENV)
    try:
        return config.load(path)
    except config.ConfigError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _use_local_broker(env_file: Path) -> None:
    """Put `env_file`'s `FIELDGATE_*` lines into the environment, under what is already set
    there (the environment still wins). Into `os.environ`, not into one load: the daemon
    reads its config again on a reload, and must find the same broker there."""
    try:
        text = env_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except OSError as exc:
        typer.echo(f"fieldgate: {env_file}: cannot read: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith(config.ENV_PREFIX):
            os.environ.setdefault(key, value)
