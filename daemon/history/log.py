"""The cleanup history: one JSON object per line, appended whole, reopened after logrotate.

Why it is safe for several writers (the daemon and a `ckptd prune` run by hand): each record is
encoded first and appended on an `O_APPEND` descriptor under an exclusive `flock`, so two writers
never interleave inside a line. A record is written whole or not at all: on a full filesystem a
write may store only part of a line; that part is cut off again (`ftruncate` to where the record
began), so the next record never lands on a half line and only the record that did not fit is
lost (counted in `dropped`, said in the log). A half line left by anything else (a crash of an
older version) is ended before the next record, never continued.
Why it survives logrotate without `copytruncate`: before each write the path is stat'ed; when the
file is gone or its inode changed (rotated away), the old descriptor is closed and the path is
opened again, so new records land in the new file and none are lost in the rotated one.

Every writer in ckptd calls `record(event)` with one of the typed events of
`daemon.history.events`; code that may run without a history file gets `NULL_HISTORY`, which
takes the same calls and writes nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from daemon.clock import utc_iso
from daemon.history.events import HistoryEvent

log = logging.getLogger("ckptd.history")

# Record fields that are always present; `write` refuses to let callers overwrite them.
RESERVED_FIELDS = ("time", "event")


class History(Protocol):
    """Where history records go: a `HistoryLog`, or `NULL_HISTORY` for none."""

    def record(self, event: HistoryEvent, *, time: float | None = None) -> None: ...

    def close(self) -> None: ...


class NullHistory:
    """Given records, write none of them: the history of a run that keeps none."""

    def record(self, event: HistoryEvent, *, time: float | None = None) -> None:
        """Given an event, do nothing."""

    def close(self) -> None:
        """Given nothing open, do nothing."""


NULL_HISTORY = NullHistory()


class HistoryLog:
    """Given a path, append history records to it.

    `record(event)` appends one line `{"time": <UTC ISO>, "event": <its name>, <its fields>}`
    (daemon/history/events.py lists every event). `time=` (seconds since the epoch) may be
    passed to use the caller's clock; otherwise the wall clock is read. Thread-safe.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._descriptor: int | None = None
        self._identity: tuple[int, int] | None = None
        self.dropped = 0  # records that could not be written (full disk, read-only, ...)

    def _open(self) -> int:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        # Read access too: the last byte tells whether the file ends inside a line.
        descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        status = os.fstat(descriptor)
        self._descriptor = descriptor
        self._identity = (status.st_dev, status.st_ino)
        return descriptor

    def _current_descriptor(self) -> int:
        """Given the log's state, return a descriptor for the file now at `path` (reopening)."""
        if self._descriptor is not None:
            try:
                status = os.stat(self.path)
                if (status.st_dev, status.st_ino) == self._identity:
                    return self._descriptor
            except FileNotFoundError:
                pass
            os.close(self._descriptor)
            self._descriptor = None
        return self._open()

    def record(self, event: HistoryEvent, *, time: float | None = None) -> None:
        """Given an event, append its record to the history."""
        fields = event.fields()
        if time is not None:
            fields["time"] = time
        self.write(event.event, **fields)

    def write(self, event: str, **fields: Any) -> None:
        """Given an event name and its fields, append one whole JSON line to the history.

        The line writer under `record`; ckptd itself writes only through `record`.
        """
        clock = fields.pop("time", None)
        record: dict[str, Any] = {
            "time": utc_iso(float(clock) if clock is not None else datetime.now(UTC).timestamp()),
            "event": event,
        }
        record.update(fields)
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                _append_whole(self._current_descriptor(), line)
            except OSError as error:
                # A full disk is the very reason to prune: a record that cannot be written must
                # not stop the deletions that free the space. Said in the log, counted here.
                self.dropped += 1
                log.warning("could not append to the history %s: %s (%s)", self.path, error, event)

    def close(self) -> None:
        """Given an open log, close its descriptor (a later write reopens it)."""
        with self._lock:
            if self._descriptor is not None:
                os.close(self._descriptor)
                self._descriptor = None

    def __enter__(self) -> HistoryLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _append_whole(descriptor: int, line: bytes) -> None:
    """Given the history's descriptor and one encoded record, append it whole or not at all.

    Under an exclusive `flock` (every writer of the history takes it), so where the record
    starts is known: a write cut short (a full filesystem) is undone with `ftruncate`, and the
    OSError raised. A file that ends inside a line gets a newline before the record.
    """
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        start = os.fstat(descriptor).st_size
        if start and os.pread(descriptor, 1, start - 1) != b"\n":
            line = b"\n" + line
        written = 0
        try:
            while written < len(line):
                written += os.write(descriptor, line[written:])
        except OSError:
            if written:
                os.ftruncate(descriptor, start)
            raise
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)


def read_records(path: str) -> list[dict[str, Any]]:
    """Given a history file, return its records in order (unparseable lines skipped)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_records(handle)
    except FileNotFoundError:
        return []


def parse_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Given the lines of a history file, return its records in order (unparseable skipped)."""
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def default_history_path(environment: dict[str, str] | None = None) -> str:
    """Given the environment, return the history path used when there is no config file.

    `$XDG_STATE_HOME/ckptd/history.jsonl`, else `~/.local/state/ckptd/history.jsonl`: a user
    running `ckptd prune ROOT` by hand has no /var/log/ckptd and should not need root for it.
    """
    env = os.environ if environment is None else environment
    state_home = env.get("XDG_STATE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state_home, "ckptd", "history.jsonl")
