"""`fieldgate admin` and `fieldgate status`: ask the running daemon, print the answer.

Readable tables on a terminal, JSON when piped (or with --json-output), so the
same command serves the operator at 3 a.m. and the script in cron.
Exit codes: 0 ok, 1 the daemon answered with an error, 2 bad usage or config,
3 no answer in time.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway import admin_client
from gateway.config import ConfigError, Settings, load

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file", envvar="FIELDGATE_CONFIG"),
]


def _settings(path: Path | None) -> Settings:
    try:
        return load(path)
    except ConfigError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _parse_args(pairs: list[str], raw_json: str | None) -> dict[str, Any]:
    """`--json` gives typed values; `--arg k=v` gives strings the daemon coerces."""
    args: dict[str, Any] = {}
    if raw_json:
        try:
            loaded = json.loads(raw_json)
        except ValueError as exc:
            raise typer.BadParameter(f"--json: {exc}") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("--json takes a JSON object")
        args.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--arg takes key=value, got {pair!r}")
        args[key] = value
    return args


def admin(
    command: Annotated[str, typer.Argument(help="e.g. health, stats, sync/history")],
    arg: Annotated[
        list[str] | None, typer.Option("--arg", "-a", help="key=value argument (repeatable)")
    ] = None,
    raw_json: Annotated[
        str | None, typer.Option("--json", help="arguments as a JSON object")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json-output", help="print JSON")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 10.0,
    config_path: ConfigOption = None,
) -> None:
    """Send an admin command to the running daemon and print its answer."""
    settings = _settings(config_path)
    args = _parse_args(arg or [], raw_json)
    as_json = json_output or not sys.stdout.isatty()
    console = Console(stderr=True)
    progress = Progress(
        TextColumn(f"[bold]{command}"), BarColumn(), MofNCompleteColumn(), console=console
    )
    bar: list[Any] = []

    def accepted() -> None:
        progress.start()
        bar.append(progress.add_task(command, total=None))

    def advance(done: int, total: int) -> None:
        if bar:
            progress.update(bar[0], completed=done, total=total or None)

    try:
        answer = asyncio.run(
            admin_client.request(
                settings,
                command,
                args,
                timeout_s=timeout,
                on_accepted=accepted,
                on_progress=advance,
            )
        )
    except admin_client.AdminTimeout as exc:
        typer.echo(f"fieldgate: {command}: {exc} (is the daemon running?)", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.: one line, no traceback
        typer.echo(f"fieldgate: cannot reach the broker: {exc}", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    finally:
        if bar:
            progress.stop()
    ok = answer.get("status") == "ok"
    if as_json:
        typer.echo(json.dumps(answer, indent=None if not sys.stdout.isatty() else 2))
    else:
        _show(answer)
    if not ok:
        raise typer.Exit(EXIT_ERROR)


def status(
    json_output: Annotated[bool, typer.Option("--json-output", help="print JSON")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Show the daemon's retained status and last health report from the broker."""
    settings = _settings(config_path)
    try:
        found = asyncio.run(admin_client.retained(settings))
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"fieldgate: cannot reach the broker: {exc}", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    if json_output or not sys.stdout.isatty():
        typer.echo(json.dumps(found))
    else:
        console = Console()
        if not found:
            console.print("no status retained: the daemon never ran with this topic root")
        for name, value in found.items():
            console.print(_table(name, value))
    state = found.get("status", {}).get("state")
    if state != "online":
        raise typer.Exit(EXIT_ERROR)


def _show(answer: dict[str, Any]) -> None:
    console = Console()
    if answer.get("status") != "ok":
        error = answer.get("error") or {}
        path = f" at {error['path']}" if error.get("path") else ""
        console.print(f"[red]error[/red] {error.get('code')}: {error.get('message')}{path}")
        return
    data = answer.get("data") or {}
    items = data.get("items") if isinstance(data, dict) else None
    if isinstance(items, list):
        console.print(_items_table(items))
        if data.get("next_cursor"):
            console.print(f"more: --arg cursor={data['next_cursor']}")
        rest = {k: v for k, v in data.items() if k not in ("items", "next_cursor")}
        if rest:
            console.print(_table("", rest))
        return
    console.print(_table("", data))


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"checks": {"mqtt": {"ok": true}}}` -> `{"checks.mqtt.ok": true}`: one row per fact."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _table(title: str, data: Any) -> Table:
    table = Table(title=title or None, show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    if isinstance(data, dict):
        for key, value in _flat(data).items():
            table.add_row(key, _cell(value))
    else:
        table.add_row("", _cell(data))
    return table


def _items_table(items: list[Any]) -> Table:
    rows = [_flat(item) if isinstance(item, dict) else {"value": item} for item in items]
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    if not items:
        table.caption = "no items"
    return table
