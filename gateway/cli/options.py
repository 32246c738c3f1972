"""What every `fieldgate` command shares: the `--config` option and loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gateway import config

EXIT_USAGE = 2

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
    """Load the config (and the environment over it) or exit 2 with its one-line reason."""
    try:
        return config.load(path)
    except config.ConfigError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
