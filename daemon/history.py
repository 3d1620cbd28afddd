"""The cleanup history: one JSON object per line, appended whole, reopened after logrotate."""

from __future__ import annotations

from typing import Any


class HistoryLog:
    """Given a path, append history records to it.

    `write(event, **fields)` appends one line `{"time": <UTC ISO>, "event": event, **fields}`;
    events used across ckptd: "delete", "prune_run", "prune_refused", "veto", "trash_purge",
    "snapshot", "snapshot_skipped", "snapshot_failed", "disk_warn", "disk_critical",
    "emergency_prune", "alert".
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        raise NotImplementedError
