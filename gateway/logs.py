"""Logging: JSON lines for journald and log shippers, readable text on a terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

Format = Literal["auto", "json", "console"]


class LineWriter:
    """A structlog logger that writes one line per event and never raises.

    When stdout goes away (journald restarted, the pipe's reader gone) a write
    raises; from a signal handler that would swallow SIGTERM and leave a daemon
    that cannot be stopped. A lost log line is the lesser harm: from the first
    failed write on, stdout is /dev/null (as the Python docs advise for SIGPIPE),
    so that the exit's final flush does not fail either and turn a clean stop
    into exit status 120.
    """

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        try:
            self._file.write(message + "\n")
            self._file.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._file.fileno())

    debug = info = warning = warn = error = critical = exception = fatal = msg


def _line_writer(*_args: Any) -> LineWriter:
    return LineWriter(sys.stdout)


def setup(level: str = "info", fmt: Format = "auto", process: str | None = None) -> None:
    """Configure structlog and route the stdlib loggers of libraries to the same place.

    `process` names the process on every line (the engine process's, which shares the
    daemon's stdout and journal), from every thread."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            *([_named(process)] if process else []),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=_line_writer,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stdout,
        format="%(levelname)s %(name)s %(message)s",
        force=True,
    )


def _named(process: str) -> structlog.typing.Processor:
    def name(_logger: Any, _method: str, event: structlog.typing.EventDict) -> Any:
        event.setdefault("process", process)
        return event

    return name


def set_level(level: str) -> None:
    """Change the level at run time (admin `log_level`, SIGHUP)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]))
