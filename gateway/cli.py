"""The `fieldgate` command: run the daemon, migrate, simulate devices, administer."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from gateway import config, logs

app = typer.Typer(
    name="fieldgate",
    help="MQTT gateway for offline field crews.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

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
    """Load the config or exit 2 with its one-line reason."""
    try:
        return config.load(path)
    except config.ConfigError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(2) from None


def run_async(main: object) -> object:
    """Run a coroutine on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


@app.command()
def run(
    config_path: ConfigOption = None,
    no_upgrade: Annotated[
        bool, typer.Option("--no-upgrade", help="Do not migrate the database at start.")
    ] = False,
) -> None:
    """Run the gateway until SIGTERM (or Ctrl-C)."""
    settings = load_settings(config_path)
    if no_upgrade:
        settings = settings.model_copy(
            update={"database": settings.database.model_copy(update={"auto_upgrade": False})}
        )
    logs.setup(settings.log.level, settings.log.format)
    from gateway.daemon import Daemon

    async def main() -> int:
        return await Daemon(settings, config_path).run()

    code = run_async(main())
    raise typer.Exit(int(code) if isinstance(code, int) else 1)


@db_app.command("upgrade")
def db_upgrade(
    config_path: ConfigOption = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the database to the newest schema (or REVISION)."""
    from storage import migrate

    settings = load_settings(config_path)
    migrate.upgrade(settings.database.url, revision)
    typer.echo(f"database at {revision}: {config.hide_url_password(settings.database.url)}")


@db_app.command("current")
def db_current(config_path: ConfigOption = None) -> None:
    """Print the schema revision of the database, and the newest one known."""
    from storage import migrate

    settings = load_settings(config_path)
    current = asyncio.run(migrate.current(settings.database.url))
    head = migrate.head()
    typer.echo(f"current: {current or 'empty'}\nhead:    {head}")
    if current != head:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="fieldgate")


if __name__ == "__main__":
    main()
    sys.exit(0)
