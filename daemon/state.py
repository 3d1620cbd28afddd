"""The daemon's small state file (`<state_dir>/state.json`): last runs and next scheduled ones.

Written by the running daemon, read by `ckptd status`. Keys: "pid", "started",
"last_prune", "last_snapshot", "last_disk_check" (each a dict with at least "time", UTC ISO), and
"next" (job name -> UTC ISO time).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from daemon.jsonfile import replace_file

_lock = threading.Lock()


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def read_state(state_dir: str) -> dict[str, Any]:
    """Given the state folder, return the state (empty when there is none or it is unreadable)."""
    try:
        with open(state_path(state_dir), encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def update_state(state_dir: str, **updates: Any) -> dict[str, Any]:
    """Given the state folder and keys to set, merge them in atomically and return the new state.

    Written to a temporary file and renamed, so a reader never sees half a file.
    """
    with _lock:
        state = read_state(state_dir)
        state.update(updates)
        # Not fsynced: rewritten after every prune, on the disk the trainer writes to; a crash
        # loses at most the last times, which the next run writes again.
        replace_file(
            state_path(state_dir),
            lambda handle: json.dump(state, handle, indent=1, sort_keys=True, default=str),
            durable=False,
        )
        return state
