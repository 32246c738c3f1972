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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from gateway.cli import client, render
from gateway.cli.options import EXIT_USAGE, ConfigOption, load_settings
from gateway.config import Settings
from gateway.mqtt.client import TlsFileError, describe

EXIT_ERROR = 1
EXIT_TIMEOUT = 3
STATUS_ASK_S = 3.0
"""How long `fieldgate status` waits for the daemon's own figures before it shows the
last retained report instead."""


def _parse_args(pairs: list[str], raw_json: str | None) -> dict[str, Any]:
    """`--json` gives typed values; `--arg k=v` gives strings the daemon coerces, and a
    key given more than once gives the list of its values (`--arg ids=a --arg ids=b`)."""
    args: dict[str, Any] = {}
    if raw_json:
        try:
            loaded = json.loads(raw_json)
        except ValueError as exc:
            raise typer.BadParameter(f"--json: {exc}") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("--json takes a JSON object")
        args.update(loaded)
    given: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--arg takes key=value, got {pair!r}")
        given.setdefault(key, []).append(value)
    for key, values in given.items():
        args[key] = values[0] if len(values) == 1 else values
    return args


def _list_hint(answer: dict[str, Any], pairs: list[str]) -> str | None:
    """What to type when one `--arg` value went where the command takes a list."""
    error = answer.get("error") or {}
    path = error.get("path")
    given = [p for p in pairs if p.partition("=")[0] == path]
    if error.get("code") != "invalid_args" or len(given) != 1:
        return None
    if "array" not in str(error.get("message", "")):
        return None
    value = given[0].partition("=")[2]
    return (
        f"{path} takes a list: repeat the key (--arg {path}={value} --arg {path}=...)"
        f' or give it as JSON (--json \'{{"{path}": ["{value}"]}}\')'
    )


def admin(
    command: Annotated[str, typer.Argument(help="e.g. health, stats, sync/history")],
    arg: Annotated[
        list[str] | None,
        typer.Option("--arg", "-a", help="key=value argument; a key repeated gives a list"),
    ] = None,
    raw_json: Annotated[
        str | None, typer.Option("--json", help="arguments as a JSON object")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json-output", help="print JSON")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for an answer")] = 10.0,
    config_path: ConfigOption = None,
) -> None:
    """Send an admin command to the running daemon and print its answer."""
    settings = load_settings(config_path)
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
            client.request(
                settings,
                command,
                args,
                timeout_s=timeout,
                on_accepted=accepted,
                on_progress=advance,
            )
        )
    except client.AdminTimeout as exc:
        typer.echo(f"fieldgate: {command}: {exc} (is the daemon running?)", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    except TlsFileError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.: one line, no traceback
        typer.echo(f"fieldgate: {_unreachable(settings, exc)}", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    finally:
        if bar:
            progress.stop()
    ok = answer.get("status") == "ok"
    if as_json:
        typer.echo(json.dumps(answer, indent=None if not sys.stdout.isatty() else 2))
    else:
        render.show(command, answer)
    if not ok:
        if hint := _list_hint(answer, arg or []):
            typer.echo(f"hint: {hint}", err=True)
        raise typer.Exit(EXIT_ERROR)


def _unreachable(settings: Settings, exc: BaseException) -> str:
    """Which broker could not be reached: the config, the environment or `make run`'s
    var/broker.env may each have chosen it, and the operator must see which won."""
    return f"cannot reach the broker at {settings.mqtt.host}:{settings.mqtt.port}: {describe(exc)}"


def status(
    json_output: Annotated[bool, typer.Option("--json-output", help="print JSON")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Is the daemon up, and how is it doing? Its figures of now, or the last report.

    The retained `<root>/status` says whether it is online. Its health and stats
    are asked for (`health`, `stats`); when it does not answer, the last retained
    `<root>/health` report is shown instead. `source` says which.
    """
    settings = load_settings(config_path)
    try:
        found = asyncio.run(_status(settings))
    except TlsFileError as exc:
        typer.echo(f"fieldgate: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except Exception as exc:  # noqa: BLE001 - broker unreachable: one line, no traceback
        typer.echo(f"fieldgate: {_unreachable(settings, exc)}", err=True)
        raise typer.Exit(EXIT_TIMEOUT) from None
    if json_output or not sys.stdout.isatty():
        typer.echo(json.dumps(found))
    else:
        console = Console()
        if not found:
            console.print("no status retained: the daemon never ran with this topic root")
        for name in ("status", "health"):
            if name in found:
                console.print(render.facts(name, found[name]))
        if "source" in found:
            console.print(
                "health and stats: asked of the daemon just now"
                if found["source"] == "daemon"
                else "health and stats: the last retained report (the daemon did not answer)"
            )
    state = found.get("status", {}).get("state")
    if state != "online":
        raise typer.Exit(EXIT_ERROR)


async def _status(settings: Settings) -> dict[str, Any]:
    found = await client.retained(settings)
    if found.get("status", {}).get("state") == "online":
        try:
            health, stats = await asyncio.gather(
                client.request(settings, "health", {}, timeout_s=STATUS_ASK_S),
                client.request(settings, "stats", {}, timeout_s=STATUS_ASK_S),
            )
        except client.AdminTimeout:
            pass
        else:
            if health.get("status") == "ok" and stats.get("status") == "ok":
                found["health"] = {**health["data"], **stats["data"]}
                found["source"] = "daemon"
                return found
    if "health" in found:
        found["source"] = "retained"
    return found
