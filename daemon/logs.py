"""Logging: structlog for ckptd's own events, the same processors for stdlib loggers.

On a terminal, `key=value` lines for people; otherwise (journald, a pipe) one JSON object per
line. APScheduler and watchdog log through the standard library;
`structlog.stdlib.ProcessorFormatter` renders their records with the same processors, so every
line of the daemon has one format.

Times follow ckptd's one convention (daemon.clock): UTC ISO 8601 with `+00:00` and milliseconds
in JSON, as in the history and the state file; local time with the zone named
(`2026-12-05 14:03:11 CET`) on a terminal. Values are never Python reprs: a report or result
(a dataclass, or anything with `to_dict()`) is logged as its fields, and on a terminal lists,
mappings, booleans and None are written as JSON (`["/data/run"]`, `true`, `null`).

When the stream is connected to the journal (`JOURNAL_STREAM` names its device and inode, as
systemd documents), each line starts with the sd-daemon priority prefix (`<3>` for an error):
journald strips it and stores the entry at that priority, so `journalctl -p warning` shows
ckptd's warnings and errors. Without it every line would be stored at the unit's default, info.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import tzinfo
from typing import Any, TextIO

# structlog.dev imports rich, when installed, for its traceback renderer. ckptd's console lines
# use plain tracebacks (configure_logging says so explicitly), and `ckptd run` would otherwise
# carry rich's 6 MB for nothing (bench/bench_daemon.py). A None in sys.modules makes that one
# import fail as if rich were absent, the import system's documented behaviour; rich is put back
# at once, so the commands that print tables import it as usual.
if "rich" in sys.modules:
    import structlog
else:
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]

from daemon.clock import local_text, machine_zone, utc_iso

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


def plain(value: Any) -> Any:
    """Given a value to log, return it as plain data: a dataclass (or an object with
    `to_dict()`) as its fields, tuples and sets as lists, mappings as dicts; anything else
    JSON cannot hold as its text."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        return plain(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _plain_values(_logger: Any, _method: str, event_dict: Any) -> Any:
    for key, value in event_dict.items():
        if key not in ("exc_info", "_record", "_from_structlog"):
            event_dict[key] = plain(value)
    return event_dict


def _text_of(value: Any) -> str:
    """Given a plain value that is not a string or a number, return how a terminal shows it:
    a list of simple values comma-separated (`roots=/data/a,/data/b`), anything else JSON."""
    simple = isinstance(value, list) and all(
        isinstance(item, str | int | float) and not isinstance(item, bool) for item in value
    )
    if simple and not any("," in str(item) for item in value):
        return ",".join(str(item) for item in value)
    return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def _as_text(_logger: Any, _method: str, event_dict: Any) -> Any:
    # The console renderer writes repr() of what is not a string: write plain text instead.
    for key, value in event_dict.items():
        if key in ("exc_info", "_record", "_from_structlog", "event"):
            continue
        if not isinstance(value, str) and not (
            isinstance(value, int | float) and not isinstance(value, bool)
        ):
            event_dict[key] = _text_of(value)
    return event_dict


def _utc_timestamp(_logger: Any, _method: str, event_dict: Any) -> Any:
    event_dict["timestamp"] = utc_iso(time.time())
    return event_dict


def _local_timestamper(zone: tzinfo) -> Any:
    def stamp(_logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict["timestamp"] = local_text(time.time(), zone, seconds=True)
        return event_dict

    return stamp


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
    console = _use_console(format, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _local_timestamper(machine_zone()) if console else _utc_timestamp,
        _plain_values,
    ]
    renderer: Any
    if console:
        colors = stream.isatty() and "NO_COLOR" not in os.environ
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
        final: list[Any] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _as_text,
            renderer,
        ]
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
