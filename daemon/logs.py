"""Logging: structlog for ckptd's own events, the same processors for stdlib loggers.

On a terminal, `key=value` lines for people; otherwise (journald, a pipe) one JSON object per
line. Timestamps are UTC ISO 8601. APScheduler and watchdog log through the standard library;
`structlog.stdlib.ProcessorFormatter` renders their records with the same processors, so every
line of the daemon has one format.

When the stream is connected to the journal (`JOURNAL_STREAM` names its device and inode, as
systemd documents), each line starts with the sd-daemon priority prefix (`<3>` for an error):
journald strips it and stores the entry at that priority, so `journalctl -p warning` shows
ckptd's warnings and errors. Without it every line would be stored at the unit's default, info.
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

# sd-daemon(3) priorities (syslog levels): what journald stores for a line with this prefix.
JOURNAL_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
JOURNAL_DEBUG_PRIORITY = 7


def journal_priority(levelno: int) -> int:
    """Given a stdlib level number, return its syslog priority (error 3, warning 4, info 6)."""
    for threshold, priority in JOURNAL_PRIORITIES:
        if levelno >= threshold:
            return priority
    return JOURNAL_DEBUG_PRIORITY


def is_journal_stream(stream: TextIO) -> bool:
    """Given a stream, return whether it is the journal's (JOURNAL_STREAM is its `dev:inode`).

    systemd sets JOURNAL_STREAM for a service whose stdout or stderr goes to the journal; a
    child process that inherits the variable but writes elsewhere (a pipe, a file) does not
    match, and gets no prefixes.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # io.UnsupportedOperation (a StringIO) is an OSError and a ValueError
    return expected == f"{status.st_dev}:{status.st_ino}"


class _JournalPriorityFormatter(structlog.stdlib.ProcessorFormatter):
    """The same lines, each prefixed with `<N>`, the sd-daemon priority of the record's level."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


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
    formatter_class = (
        _JournalPriorityFormatter
        if is_journal_stream(stream)
        else structlog.stdlib.ProcessorFormatter
    )
    formatter = formatter_class(foreign_pre_chain=shared, processors=final)
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
