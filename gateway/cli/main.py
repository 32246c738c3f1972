"""The `fieldgate` command: run the daemon, migrate, simulate devices, administer."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Literal

import typer

from gateway import config, logs
from gateway.cli import admin, ml
from gateway.cli.options import EXIT_USAGE, ConfigOption, load_settings
from gateway.lifecycle import run_async
from gateway.mqtt.client import TlsFileError, tls_context

app = typer.Typer(
    name="fieldgate",
    help="MQTT gateway for offline field crews.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ml.app, name="ml")
app.command()(admin.admin)
app.command()(admin.status)


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

    try:
        code = run_async(main())
    except config.ConfigError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


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


@app.command()
def simulate(
    config_path: ConfigOption = None,
    devices: Annotated[int, typer.Option(min=1, max=10_000, help="Simulated devices.")] = 10,
    rate: Annotated[float, typer.Option(min=0, help="Operations/s in all; 0 = max.")] = 100.0,
    count: Annotated[int, typer.Option(min=1, help="Stop after this many operations.")] = 10_000,
    duration: Annotated[float, typer.Option(min=0, help="...or after this many seconds.")] = 60.0,
    batch_share: Annotated[float, typer.Option(min=0, max=1)] = 0.2,
    max_batch: Annotated[int, typer.Option(min=1, max=500)] = 20,
    conflict_share: Annotated[float, typer.Option(min=0, max=1)] = 0.1,
    malformed_share: Annotated[float, typer.Option(min=0, max=1)] = 0.01,
    malformed_batches: Annotated[
        bool, typer.Option(help="Malformed payloads may be batches with one bad op.")
    ] = True,
    duplicate_share: Annotated[float, typer.Option(min=0, max=1)] = 0.0,
    entities: Annotated[int, typer.Option(min=1)] = 1000,
    hot_share: Annotated[float, typer.Option(min=0, max=1)] = 0.05,
    device_meta_share: Annotated[float, typer.Option(min=0, max=1)] = 0.5,
    seed: Annotated[int | None, typer.Option(help="[default: random]")] = None,
    scenario: Annotated[
        Literal["default", "causal"],
        typer.Option(
            help="causal: conflicts from causes a model can learn (docs/ml.md); "
            "it does not use the share options."
        ),
    ] = "default",
    inflight: Annotated[int, typer.Option(min=1, max=60_000, help="Per client.")] = 100,
    ack_wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for acks.")] = 10.0,
    allow_remote: Annotated[bool, typer.Option("--allow-remote")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Summary as JSON.")] = False,
) -> None:
    """Simulate field devices publishing sync operations; count the gateway's answers."""
    from loadgen import generator, runner

    mqtt = load_settings(config_path).mqtt
    try:
        tls = tls_context(mqtt)
    except TlsFileError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    broker = runner.Broker(
        host=mqtt.host,
        port=mqtt.port,
        topic_root=mqtt.topic_root,
        username=mqtt.username,
        password=mqtt.password.get_secret_value() if mqtt.password else None,
        tls=tls,
        keepalive_s=mqtt.keepalive_s,
    )
    gen = generator.GeneratorOptions(
        devices=devices,
        entities=entities,
        hot_share=hot_share,
        batch_share=batch_share,
        max_batch=max_batch,
        conflict_share=conflict_share,
        malformed_share=malformed_share,
        malformed_batches=malformed_batches,
        duplicate_share=duplicate_share,
        device_meta_share=device_meta_share,
        seed=generator.random_seed() if seed is None else seed,
        scenario=scenario,
    )
    run = runner.RunOptions(
        rate=rate,
        count=count,
        duration_s=duration,
        inflight=inflight,
        ack_wait_s=ack_wait,
        allow_remote=allow_remote,
    )
    raise typer.Exit(runner.cli_simulate(broker, gen, run, as_json))


def main() -> None:
    app(prog_name="fieldgate")


if __name__ == "__main__":
    main()
    sys.exit(0)
