"""Logging: JSON lines for journald and log shippers, readable text on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

Format = Literal["auto", "json", "console"]


def setup(level: str = "info", fmt: Format = "auto") -> None:
    """Configure structlog and route the stdlib loggers of libraries to the same place."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stdout,
        format="%(levelname)s %(name)s %(message)s",
        force=True,
    )


def set_level(level: str) -> None:
    """Change the level at run time (admin `log_level`, SIGHUP)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]))
