"""Logging: structlog for ckptd's own events, the same processors for stdlib loggers.

On a terminal, `key=value` lines for people; otherwise (journald, a pipe) one JSON object per
line. Timestamps are UTC ISO 8601. APScheduler and watchdog log through the standard library;
`structlog.stdlib.ProcessorFormatter` renders their records with the same processors, so every
line of the daemon has one format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_handler: logging.Handler | None = None

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _use_console(format_name: str, stream: TextIO) -> bool:
    if format_name == "console":
        return True
    if format_name == "json":
        return False
    # journald sets JOURNAL_STREAM for a service's stdout/stderr: JSON there even if it were a TTY.
    return stream.isatty() and "JOURNAL_STREAM" not in os.environ


def configure_logging(
    level: str = "info", format: str = "auto", stream: TextIO | None = None
) -> None:
    """Given a level name and `auto|console|json`, route structlog and stdlib logging to `stream`.

    Calling it again (a reload with another level) replaces the previous setup.
    """
    global _handler
    stream = sys.stderr if stream is None else stream
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if _use_console(format, stream):
        colors = stream.isatty() and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
        final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]
    else:
        final = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(default=str),
        ]
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    numeric = LEVELS.get(level, logging.INFO)
    root.setLevel(numeric)
    # Library chatter (each job run, each inotify event) only when asked for debug.
    for name in ("apscheduler.scheduler", "apscheduler.jobstores", "watchdog"):
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """Given a module name, return a structlog logger bound to it."""
    return structlog.stdlib.get_logger(name)
